"""Built-in Llama architectures and the sizes every count and estimate reads from a config.

An architecture is a Hugging Face ``config.json``-style dict; :data:`ARCHITECTURES` holds the
built-in ones by llamatune name, and :func:`dims` reads the sizes of any such dict (validated,
with the optional keys filled in as ``transformers`` does).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llamatune.errors import UserError

__all__ = ["ALIASES", "ARCHITECTURES", "LINEAR_MODULES", "REQUIRED_KEYS", "dims"]

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The linear layers of a Llama block, in order; ``all-linear`` means all of them."""


def _llama(
    vocab: int,
    hidden: int,
    layers: int,
    heads: int,
    mlp: int,
    *,
    kv_heads: int | None = None,
    head_dim: int | None = None,
    tied: bool = False,
    context: int = 4096,
    eps: float = 1e-5,
    rope_theta: float = 10000.0,
) -> dict:
    cfg = {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads if kv_heads is not None else heads,
        "intermediate_size": mlp,
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "max_position_embeddings": context,
        "rms_norm_eps": eps,
        "rope_theta": rope_theta,
    }
    if head_dim is not None:
        cfg["head_dim"] = head_dim
    return cfg


ARCHITECTURES: dict[str, dict] = {
    # LLaMA-1 (Touvron et al., 2023): 2k context, no GQA.
    "llama-7b": _llama(32000, 4096, 32, 32, 11008, context=2048, eps=1e-6),
    "llama-13b": _llama(32000, 5120, 40, 40, 13824, context=2048, eps=1e-6),
    "llama-33b": _llama(32000, 6656, 60, 52, 17920, context=2048, eps=1e-6),
    "llama-65b": _llama(32000, 8192, 80, 64, 22016, context=2048, eps=1e-6),
    # Llama 2: 4k context; GQA (8 K/V heads) only in 70B.
    "llama-2-7b": _llama(32000, 4096, 32, 32, 11008),
    "llama-2-13b": _llama(32000, 5120, 40, 40, 13824),
    "llama-2-70b": _llama(32000, 8192, 80, 64, 28672, kv_heads=8),
    # Llama 3: 128k-token vocabulary, GQA everywhere, 8k context.
    "llama-3-8b": _llama(128256, 4096, 32, 32, 14336, kv_heads=8, context=8192,
                         rope_theta=500000.0),
    "llama-3-70b": _llama(128256, 8192, 80, 64, 28672, kv_heads=8, context=8192,
                          rope_theta=500000.0),
    # llamatune's default model.
    "smollm2-135m-instruct": _llama(49152, 576, 30, 9, 1536, kv_heads=3, head_dim=64, tied=True,
                                    context=8192, rope_theta=100000.0),
}
"""Built-in architectures as ``config.json``-style dicts, by llamatune name."""

ALIASES = {"llama-30b": "llama-33b", "llama-1-7b": "llama-7b", "llama-1-13b": "llama-13b",
           "llama-1-33b": "llama-33b", "llama-1-30b": "llama-33b", "llama-1-65b": "llama-65b",
           "smollm2-135m": "smollm2-135m-instruct"}
"""Other spellings of built-in names (normalized as :mod:`llamatune.params.resolve` does)."""


@dataclass(frozen=True)
class _Dims:
    """The sizes of one architecture (the name shows in a message: kept private)."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    tied: bool
    attention_bias: bool
    mlp_bias: bool

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int, bool]]:
        """``name -> (in_features, out_features, has_bias)`` for one block."""
        h, ab, mb = self.hidden, self.attention_bias, self.mlp_bias
        return {
            "q_proj": (h, self.q_dim, ab),
            "k_proj": (h, self.kv_dim, ab),
            "v_proj": (h, self.kv_dim, ab),
            "o_proj": (self.q_dim, h, ab),
            "gate_proj": (h, self.mlp, mb),
            "up_proj": (h, self.mlp, mb),
            "down_proj": (self.mlp, h, mb),
        }


REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size")
"""The ``config.json`` keys every count needs (the others have defaults)."""


def _as_dict(config: Any) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):  # a transformers PretrainedConfig
        return config.to_dict()
    raise TypeError(f"expected a config dict, got {type(config).__name__}")


def dims(config: Any) -> _Dims:
    """Read and check the sizes of a ``config.json``-style dict.

    Args:
        config: A dict (or a ``transformers`` config object) with :data:`REQUIRED_KEYS`;
            ``num_key_value_heads`` defaults to the head count, ``head_dim`` to
            ``hidden_size // num_attention_heads``.

    Returns:
        The sizes.

    Raises:
        UserError: A required size is missing, not positive, or the heads do not divide
            into the key/value heads.
        TypeError: ``config`` is not a mapping or config object.
    """
    cfg = _as_dict(config)
    missing = [k for k in REQUIRED_KEYS if cfg.get(k) is None]
    if missing:
        raise UserError(
            f"the model config lacks {', '.join(missing)}; a Llama-style config.json "
            f"needs {', '.join(REQUIRED_KEYS)} (num_key_value_heads and head_dim are optional)."
        )
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    kv = cfg.get("num_key_value_heads")
    head_dim = cfg.get("head_dim") or hidden // heads
    d = _Dims(
        vocab=int(cfg["vocab_size"]),
        hidden=hidden,
        layers=int(cfg["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(kv) if kv else heads,
        head_dim=int(head_dim),
        mlp=int(cfg["intermediate_size"]),
        tied=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
    )
    if min(d.vocab, d.hidden, d.layers, d.heads, d.kv_heads, d.head_dim, d.mlp) <= 0:
        raise UserError(f"the model config has a non-positive size: {d}")
    if d.heads % d.kv_heads:
        raise UserError(
            f"num_attention_heads ({d.heads}) must be a multiple of num_key_value_heads "
            f"({d.kv_heads})."
        )
    return d

