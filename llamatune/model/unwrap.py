"""What a wrapper holds: the model under peft, and parameters whole where they are sharded."""

from __future__ import annotations


def live_state(module) -> dict:
    """``module``'s parameters and buffers by state-dict name, whole where they are sharded.

    Not ``state_dict()``: under FSDP2 or ZeRO-3 that returns shards, while inside
    :func:`llamatune.dist.whole_trainables` the trainable ones have whole copies.
    """
    from llamatune import dist

    return {**dict(module.named_buffers()),
            **{n: dist.whole(p) for n, p in module.named_parameters()}}


def unwrap_model(model):
    """The ``transformers`` model under a ``PeftModel`` (LoRA layers still injected)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
