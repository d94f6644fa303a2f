"""Exact parameter counts of a Llama-architecture model, and of a LoRA adapter on it.

Exact: equal to ``sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())``. With ``h``
hidden size, ``a`` heads, ``k`` key/value heads, ``d`` head dim, ``m`` MLP size, ``V``
vocabulary and ``L`` layers, one layer holds ``q,o: h*a*d`` and ``k,v: h*k*d`` attention
weights (plus ``a*d + 2*k*d + h`` biases with ``attention_bias``), ``3*h*m`` SwiGLU weights
(plus ``2*m + h`` with ``mlp_bias``) and ``2*h`` RMSNorm weights; the model adds ``V*h``
embeddings, a final ``h`` norm and a ``V*h`` head unless tied. A LoRA adapter of rank ``r`` on a
linear of shape ``in -> out`` adds ``r*(in + out)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from llamatune.config import LoraConfig
from llamatune.errors import UserError
from llamatune.params.architectures import LINEAR_MODULES, dims

__all__ = ["ParamBreakdown", "count_parameters", "lora_parameters", "lora_targets"]


@dataclass(frozen=True)
class ParamBreakdown:
    """Exact parameter counts of a ``LlamaForCausalLM``, by component.

    Attributes:
        embeddings: Token embeddings, ``vocab * hidden``.
        attention: q, k, v, o projections (and their biases) over all layers.
        mlp: gate, up and down projections (and biases) over all layers.
        norms: RMSNorm weights: two per layer plus the final norm.
        lm_head: The output head, 0 when tied to the embeddings.
        total: Everything; equals the model's ``sum(p.numel() for p in parameters())``.
        num_layers: Decoder layers.
        per_layer_attention: Attention parameters of one layer.
        per_layer_mlp: MLP parameters of one layer.
        per_layer_norms: Norm parameters of one layer.
        per_layer_total: All parameters of one layer.
        linear_weights: Weight matrices of all block linears (biases excluded): what 4-bit
            quantization replaces.
    """

    embeddings: int
    attention: int
    mlp: int
    norms: int
    lm_head: int
    total: int
    num_layers: int
    per_layer_attention: int
    per_layer_mlp: int
    per_layer_norms: int
    per_layer_total: int
    linear_weights: int

    def as_dict(self) -> dict[str, int]:
        """The counts as a plain dict (JSON-ready)."""
        return asdict(self)


def count_parameters(config: Mapping[str, Any]) -> ParamBreakdown:
    """Count the parameters of a Llama-architecture model exactly.

    Args:
        config: A ``config.json``-style dict (an entry of :data:`ARCHITECTURES`, a loaded
            ``config.json``, or a ``transformers`` config object).

    Returns:
        The per-component and per-layer counts.

    Raises:
        UserError: The config lacks a required size or is inconsistent.
    """
    d = dims(config)
    lin = d.linears()
    attn = sum(i * o + (o if b else 0) for n, (i, o, b) in lin.items() if n in LINEAR_MODULES[:4])
    mlp = sum(i * o + (o if b else 0) for n, (i, o, b) in lin.items() if n in LINEAR_MODULES[4:])
    norms = 2 * d.hidden
    per_layer = attn + mlp + norms
    emb = d.vocab * d.hidden
    head = 0 if d.tied else d.vocab * d.hidden
    return ParamBreakdown(
        embeddings=emb,
        attention=attn * d.layers,
        mlp=mlp * d.layers,
        norms=norms * d.layers + d.hidden,
        lm_head=head,
        total=emb + head + per_layer * d.layers + d.hidden,
        num_layers=d.layers,
        per_layer_attention=attn,
        per_layer_mlp=mlp,
        per_layer_norms=norms,
        per_layer_total=per_layer,
        linear_weights=d.layers * sum(i * o for i, o, _ in lin.values()),
    )


def lora_targets(target_modules: str | Iterable[str] | None) -> tuple[str, ...]:
    """The LoRA target linears, in block order and without repeats.

    Args:
        target_modules: A name or names among :data:`LINEAR_MODULES`, or ``"all-linear"``/
            ``None`` for all of them.

    Returns:
        The names.

    Raises:
        UserError: A name is not a linear of the block.
    """
    if target_modules is None or target_modules == "all-linear":
        return LINEAR_MODULES
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    names = list(dict.fromkeys(target_modules))
    bad = [n for n in names if n not in LINEAR_MODULES]
    if bad:
        raise UserError(
            f"unknown LoRA target module(s) {', '.join(map(repr, bad))}; choose among "
            f"{', '.join(LINEAR_MODULES)} or 'all-linear'."
        )
    return tuple(n for n in LINEAR_MODULES if n in names)


def lora_parameters(
    config: Mapping[str, Any],
    r: int,
    target_modules: str | Iterable[str] | None = LoraConfig().target_modules,
) -> int:
    """Count the trainable parameters of a LoRA adapter.

    Each adapted linear ``in -> out`` gets ``A: r x in`` and ``B: out x r``, so ``r*(in+out)``
    parameters, in every layer.

    Args:
        config: A ``config.json``-style dict.
        r: The adapter rank.
        target_modules: Names among :data:`LINEAR_MODULES`, or ``"all-linear"``/``None`` for all.

    Returns:
        The number of adapter parameters.

    Raises:
        UserError: ``r`` is not positive or a target name is unknown.
    """
    if r <= 0:
        raise UserError(f"LoRA rank must be positive, got {r}.")
    d = dims(config)
    lin = d.linears()
    return d.layers * sum(r * (lin[n][0] + lin[n][1]) for n in lora_targets(target_modules))

