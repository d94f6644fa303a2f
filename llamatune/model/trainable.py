"""What trains, written and read back: the final save and the checkpoints of every stage."""

from __future__ import annotations

from pathlib import Path

from llamatune.model.adapters import save_adapter
from llamatune.model.base import Loaded
from llamatune.model.heads import load_head, save_head
from llamatune.model.unwrap import live_state, unwrap_model
from llamatune.rundir import head_file


def save_trainable(loaded: Loaded, folder) -> None:
    """Write what trains: the trainable adapter (as peft's default) and trainable heads.

    A full fine-tune (no adapter) writes the whole model with ``save_pretrained``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = loaded.trainable_adapter
    if name is not None:
        save_adapter(loaded.model, name, folder)
    elif loaded.trainable and not loaded.adapters:
        inner = unwrap_model(loaded.model)
        keys = inner.state_dict().keys()
        inner.save_pretrained(str(folder), safe_serialization=True, state_dict={
            k: v.detach() for k, v in live_state(inner).items() if k in keys})
    for hname, head in loaded.heads.items():
        if any(p.requires_grad for p in head.parameters()):
            save_head(head, folder / head_file(hname))


def load_trainable(loaded: Loaded, folder) -> None:
    """Load what :func:`save_trainable` wrote (a checkpoint) back into ``loaded``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    name = loaded.trainable_adapter
    if name is not None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(loaded.model, load_file(str(folder / "adapter_model.safetensors")),
                                  adapter_name=name)
    elif (folder / "model.safetensors").is_file():
        unwrap_model(loaded.model).load_state_dict(load_file(str(folder / "model.safetensors")),
                                                   strict=False)
    for hname, head in loaded.heads.items():
        if (folder / head_file(hname)).is_file():
            load_head(head, folder / head_file(hname))
