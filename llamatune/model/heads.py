"""Scalar heads (a reward model's score, PPO's value) on the backbone's last hidden state."""

from __future__ import annotations

from llamatune.errors import UserError
from llamatune.model.base import Loaded
from llamatune.model.unwrap import live_state


class _Head:  # a namespace so that torch stays a lazy import
    cls = None


def scalar_head_class():
    """The :class:`ScalarHead` module class (defined on first use: torch is imported lazily)."""
    if _Head.cls is None:
        import torch

        class ScalarHead(torch.nn.Module):
            """``hidden -> one number`` (a reward model's score, PPO's value), in float32.

            Args:
                hidden_size: The backbone's hidden size.
                bias: Give the head a bias (a value head's baseline; a pairwise reward loss
                    cannot train one, so a score head has none, as in transformers).
            """

            def __init__(self, hidden_size: int, bias: bool = True):
                super().__init__()
                self.linear = torch.nn.Linear(hidden_size, 1, bias=bias, dtype=torch.float32)

            def forward(self, hidden):
                """``[..., d]`` hidden states to ``[...]`` float32 scalars."""
                return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)

        _Head.cls = ScalarHead
    return _Head.cls


def add_head(loaded: Loaded, name: str, *, source: str | None = None, trainable: bool = True,
             bias: bool | None = None) -> object:
    """Attach a scalar head named ``name`` on the backbone's last hidden state.

    A new head is initialized like transformers' score heads (normal with the model's
    ``initializer_range``, zero bias); ``source`` loads a saved one (``*.safetensors``).
    ``bias``: ``None`` takes the saved head's (a new head: none).

    Returns:
        The head module.

    Raises:
        UserError: A saved head's width does not match the backbone.
    """
    import torch

    hidden = loaded.model.config.hidden_size
    if bias is None:
        bias = source is not None and _saved_has_bias(source)
    head = scalar_head_class()(hidden, bias=bias).to(loaded.device)
    if source is None:
        std = getattr(loaded.model.config, "initializer_range", 0.02)
        with torch.no_grad():
            head.linear.weight.normal_(0.0, std)
            if bias:
                head.linear.bias.zero_()
    else:
        load_head(head, source)
    head.requires_grad_(trainable)
    loaded.heads[name] = head
    return head


def _saved_has_bias(path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return "bias" in f.keys()


def save_head(head, path) -> None:
    """Write a scalar head as safetensors (``weight`` ``[1, d]``, and ``bias`` ``[1]`` if any)."""
    from safetensors.torch import save_file

    sd = {k: v.detach().cpu().clone() for k, v in live_state(head.linear).items()}
    save_file(sd, str(path), metadata={"format": "pt", "kind": "llamatune-scalar-head"})


def load_head(head, path) -> None:
    """Load a head written by :func:`save_head` into ``head``.

    Raises:
        UserError: The file's width differs from the head's.
    """
    from safetensors.torch import load_file

    sd = load_file(str(path))
    want = tuple(head.linear.weight.shape)
    if tuple(sd.get("weight", ()).shape if "weight" in sd else ()) != want:
        raise UserError(f"{path}: a scalar head for hidden size "
                        f"{sd['weight'].shape[-1] if 'weight' in sd else '?'}, but this model's "
                        f"is {want[1]}; it belongs to another base model.")
    if "bias" in sd and head.linear.bias is None:
        sd.pop("bias")  # a value head initialized from a reward head: no baseline to copy
    head.linear.load_state_dict({k: v.to(head.linear.weight.device) for k, v in sd.items()},
                                strict=head.linear.bias is None or "bias" in sd)
