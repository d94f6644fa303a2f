"""First-principles memory estimates: a training step's peak, and 4-bit inference.

Training memory is weights + LoRA adapters + gradients + optimizer state + saved activations
+ the larger of two transient phases (the loss buffers at the start of the backward pass, or
one layer's backward); :mod:`llamatune.params.activations` counts the activations.

Optimizer state follows llamatune's loop, ``torch.optim.AdamW`` on the trainable tensors: two
moments in the dtype of those tensors (float32 adapters; the weight dtype for full fine-tuning),
or, with ``master_weights=True``, float32 moments plus a float32 master copy (mixed-precision
recipes that keep 16-bit weights).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from llamatune.config import LoraConfig, ModelConfig
from llamatune.errors import UserError
from llamatune.params.activations import Setup, activation_bytes
from llamatune.params.architectures import _Dims, dims
from llamatune.params.counts import ParamBreakdown, count_parameters, lora_parameters, lora_targets

__all__ = [
    "DEFAULT_OPTIMIZER",
    "GB",
    "NF4_BITS_PER_PARAM",
    "OPTIMIZERS",
    "PUBLISHED_4BIT_INFERENCE_GB",
    "MemoryEstimate",
    "estimate_memory",
]

GB = 10**9
"""Bytes in the GB printed by the tables (decimal, like GPU spec sheets)."""

NF4_BITS_PER_PARAM = 4 + 8 / 64 + 32 / (64 * 256)
"""nf4 with double quantization: 4 bits per weight, an 8-bit absmax per 64-weight block and a
float32 absmax per 256 such blocks (bitsandbytes' defaults): about 4.127 bits."""

PUBLISHED_4BIT_INFERENCE_GB = {"llama-2-7b": 5.5, "llama-2-13b": 8.9, "llama-2-70b": 37.6}
"""Commonly quoted GPU memory for 4-bit Llama-2 inference, for comparison."""

DEFAULT_OPTIMIZER = "adamw"
"""The optimizer of llamatune's loop, ``torch.optim.AdamW``."""

OPTIMIZERS = {
    # name -> (states per trainable parameter, fixed bytes per parameter or None for "states
    # in the parameter's dtype")
    "adamw": (2, None),  # exp_avg + exp_avg_sq, zeros_like(param)
    "adamw_torch": (2, None),
    "adamw_8bit": (2, 1 + 4 / 2048),  # uint8 states, a float32 absmax per 2048-block
    "paged_adamw_8bit": (2, 1 + 4 / 2048),
    "sgd": (0, None),
}

@dataclass
class MemoryEstimate:
    """Training and 4-bit inference memory for one configuration, in bytes.

    Attributes:
        method: ``full``, ``lora`` or ``qlora``.
        batch: Sequences per micro-batch.
        seq: Tokens per sequence.
        gradient_checkpointing: Whether :attr:`activations` assumes checkpointing.
        weight_dtype_bytes: Bytes per weight of the non-quantized parts (2: bf16/fp16, 4: fp32).
        activation_dtype_bytes: Bytes per element of the hidden states during training.
        lora_r: Adapter rank (0 for full fine-tuning).
        optimizer: Optimizer name.
        parameters: Base model parameters.
        trainable_params: Parameters that receive gradients.
        weights: Base weights (quantized ones at their packed size, plus the dequantization
            buffer of the largest layer for QLoRA).
        adapters: LoRA adapter weights (float32).
        gradients: Gradients of the trainable parameters.
        optimizer_state: Optimizer moments, plus a float32 master copy when full fine-tuning
            keeps 16-bit weights.
        activations: Saved activations under the chosen checkpointing setting.
        activations_no_checkpointing: Saved activations without checkpointing.
        activations_checkpointing: With per-layer checkpointing: every layer's input plus one
            recomputed layer.
        per_layer_activations: What one decoder layer saves without checkpointing.
        logits: The loss buffers at the start of the backward pass.
        backward_workspace: Gradient buffers of one layer's backward beyond what that layer
            has already freed (eager attention's ``heads x seq^2`` gradients; 0 for SDPA).
        total: The peak of a training step: weights + adapters + gradients + optimizer state +
            activations + the larger of :attr:`logits` and the layer-backward phase
            (:attr:`backward_workspace`, plus one recomputed layer with checkpointing), which
            are live at different times.
        inference_4bit: nf4 inference at ``batch x seq``: component -> bytes, with ``total``.
        assumptions: Plain-language assumptions behind the numbers.
    """

    method: str
    batch: int
    seq: int
    gradient_checkpointing: bool
    weight_dtype_bytes: int
    activation_dtype_bytes: int
    lora_r: int
    optimizer: str
    parameters: int
    trainable_params: int
    weights: int
    adapters: int
    gradients: int
    optimizer_state: int
    activations: int
    activations_no_checkpointing: int
    activations_checkpointing: int
    per_layer_activations: int
    logits: int
    backward_workspace: int
    total: int
    inference_4bit: dict[str, int] = field(default_factory=dict)
    assumptions: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The estimate as a plain dict (JSON-ready)."""
        return asdict(self)


def _inference_4bit(d: _Dims, pc: ParamBreakdown, batch: int, seq: int) -> dict[str, int]:
    lin = d.linears()
    packed = pc.linear_weights * 4 // 8
    consts = round(pc.linear_weights * (NF4_BITS_PER_PARAM - 4) / 8)
    sixteen = 2 * (pc.total - pc.linear_weights)  # embeddings, head, norms, biases in 16-bit
    kv = 2 * d.layers * batch * seq * d.kv_dim * 2
    tokens = batch * seq
    largest = max(i * o for i, o, _ in lin.values())
    # Prefill working set: one dequantized weight, the MLP intermediates and residual stream of
    # one layer, and float32 logits of the last position.
    overhead = 2 * largest + 2 * tokens * (3 * d.mlp + 2 * d.hidden) + 4 * batch * d.vocab
    out = {
        "linear_weights_4bit": packed,
        "quant_constants": consts,
        "weights_16bit": sixteen,
        "kv_cache": kv,
        "overhead": overhead,
    }
    out["total"] = sum(out.values())
    return out


def estimate_memory(
    config: Mapping[str, Any],
    method: str,
    batch: int,
    seq: int,
    gradient_checkpointing: bool,
    lora_r: int = LoraConfig().r,
    weight_dtype_bytes: int = 2,
    optimizer: str = DEFAULT_OPTIMIZER,
    *,
    target_modules: str | Iterable[str] | None = LoraConfig().target_modules,
    lora_dropout: float = 0.0,
    attn_implementation: str = ModelConfig().attn_implementation,
    device: str = "cuda",
    padding_mask: bool = False,
    master_weights: bool = False,
) -> MemoryEstimate:
    """Estimate the peak memory of a training step and of 4-bit inference.

    The training total is weights + adapters + gradients + optimizer state + saved activations
    + loss buffers (see :mod:`llamatune.params.activations` for the activation formula and
    :attr:`MemoryEstimate.assumptions` for the rest).

    Args:
        config: A ``config.json``-style dict.
        method: ``full`` (every weight trains), ``lora`` (frozen base + float32 adapters) or
            ``qlora`` (nf4 base with double quantization + float32 adapters).
        batch: Sequences per micro-batch.
        seq: Tokens per sequence.
        gradient_checkpointing: Recompute each decoder layer in the backward pass.
        lora_r: Adapter rank (ignored for ``full``).
        weight_dtype_bytes: Bytes per weight: 2 for bf16/fp16, 4 for fp32. For ``qlora`` the
            compute dtype of the 4-bit matmuls.
        optimizer: ``adamw`` (or ``adamw_torch``), ``adamw_8bit``, ``paged_adamw_8bit``, ``sgd``.
        target_modules: LoRA targets among :data:`LINEAR_MODULES`, or ``all-linear``.
        lora_dropout: LoRA dropout probability; above 0 it keeps a dropout output and mask per
            adapted linear.
        attn_implementation: ``sdpa`` (memory-efficient kernels, no ``seq^2`` term) or ``eager``.
        device: ``cuda`` or ``cpu``; only changes the LoRA dropout mask size.
        padding_mask: Batches carry a padding (or packing) mask, so SDPA gets K/V repeated to
            every head (``transformers`` only uses native GQA without a mask).
        master_weights: Full fine-tuning of 16-bit weights keeps float32 AdamW moments and a
            float32 master copy (mixed-precision recipes); off, the moments take the weight
            dtype, as ``torch.optim.AdamW`` on 16-bit parameters does in llamatune's loop.

    Returns:
        The estimate.

    Raises:
        UserError: An argument is out of range or unknown.
    """
    _check_arguments(method, batch, seq, weight_dtype_bytes, optimizer, attn_implementation, lora_dropout)
    d, pc = dims(config), count_parameters(config)
    full = method == "full"
    r, targets = (0, ()) if full else (lora_r, lora_targets(target_modules))
    adapter_params = 0 if full else lora_parameters(config, lora_r, targets)
    wb = weight_dtype_bytes
    # llamatune prepares 4-bit models with peft's prepare_model_for_kbit_training, which casts
    # every non-quantized weight to float32; the hidden states then stay float32 too.
    p = 4 if method == "qlora" else wb
    weights, adapters = _weight_bytes(d, pc, method, wb), 4 * adapter_params
    trainable = pc.total if full else adapter_params
    gradients = (wb if full else 4) * trainable
    state, master, optimizer_state = _optimizer_bytes(optimizer, full, wb, master_weights, trainable)
    act = _activations(d, batch, seq, bool(gradient_checkpointing), Setup(
        full=full, targets=targets, p=p, r=r, dropout=0.0 if full else lora_dropout,
        on_cuda=not str(device).startswith("cpu"), eager=attn_implementation == "eager",
        repeat_kv=padding_mask))
    total = weights + adapters + gradients + optimizer_state + act.pop("peak")
    assumptions = _assumptions(method, wb, p, optimizer, state, master, lora_r, targets, lora_dropout,
                               attn_implementation, padding_mask, bool(gradient_checkpointing))
    return MemoryEstimate(
        method=method, batch=batch, seq=seq, gradient_checkpointing=bool(gradient_checkpointing),
        weight_dtype_bytes=wb, activation_dtype_bytes=p, lora_r=r, optimizer=optimizer,
        parameters=pc.total, trainable_params=trainable, weights=weights, adapters=adapters,
        gradients=gradients, optimizer_state=optimizer_state, **act, total=total,
        inference_4bit=_inference_4bit(d, pc, batch, seq), assumptions=assumptions,
    )


def _check_arguments(method: str, batch: int, seq: int, weight_dtype_bytes: int, optimizer: str,
                     attn_implementation: str, lora_dropout: float) -> None:
    """Raise the :class:`UserError` of the first out-of-range argument of :func:`estimate_memory`."""
    if method not in ("full", "lora", "qlora"):
        raise UserError(f"method must be full, lora or qlora, got {method!r}.")
    if batch <= 0 or seq <= 0:
        raise UserError(f"batch and seq must be positive, got batch={batch}, seq={seq}.")
    if weight_dtype_bytes not in (2, 4):
        raise UserError(f"weight_dtype_bytes must be 2 or 4, got {weight_dtype_bytes}.")
    if optimizer not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {optimizer!r}; choose among {', '.join(OPTIMIZERS)}.")
    if attn_implementation not in ("sdpa", "eager"):
        raise UserError(f"attn_implementation must be sdpa or eager, got {attn_implementation!r}.")
    if not 0.0 <= lora_dropout < 1.0:
        raise UserError(f"lora_dropout must be in [0, 1), got {lora_dropout}.")


def _weight_bytes(d: _Dims, pc: ParamBreakdown, method: str, wb: int) -> int:
    """The base weights in memory: packed nf4 linears plus one dequantized one for QLoRA."""
    if method != "qlora":
        return wb * pc.total
    # peft's prepare_model_for_kbit_training casts the non-quantized weights to float32.
    other_bytes = 4
    largest = max(i * o for i, o, _ in d.linears().values())
    return (
        round(pc.linear_weights * NF4_BITS_PER_PARAM / 8)
        + other_bytes * (pc.total - pc.linear_weights)
        + wb * largest  # one layer dequantized at a time for the matmul
    )


def _optimizer_bytes(optimizer: str, full: bool, wb: int, master_weights: bool,
                     trainable: int) -> tuple[float, int, int]:
    """The optimizer's bytes: state per trainable parameter, master copy per one, and in all."""
    n_states, fixed = OPTIMIZERS[optimizer]
    param_bytes = wb if full else 4
    master = 4 if (full and master_weights and wb < 4 and n_states) else 0
    per_state = fixed if fixed is not None else (4 if master else param_bytes)
    state = n_states * per_state
    return state, master, round((state + master) * trainable)


def _activations(d: _Dims, batch: int, seq: int, gradient_checkpointing: bool,
                 setup: Setup) -> dict[str, int]:
    """The activation fields of a :class:`MemoryEstimate`, and under ``peak`` their peak."""
    act_plain, per_layer, logits, workspace = activation_bytes(d, batch, seq, setup, False)
    act_ckpt = activation_bytes(d, batch, seq, setup, True)[0]
    activations = act_ckpt if gradient_checkpointing else act_plain
    # The loss buffers are freed before the first layer's backward (and, with checkpointing,
    # before its recomputation): count the larger of the two phases.
    if gradient_checkpointing:
        peak = activations - per_layer + max(logits, per_layer + workspace)
    else:
        peak = activations + max(logits, workspace)
    return {"activations": activations, "activations_no_checkpointing": act_plain,
            "activations_checkpointing": act_ckpt, "per_layer_activations": per_layer,
            "logits": logits, "backward_workspace": workspace, "peak": peak}


_GENERAL = ("GB = 10^9 bytes; counts are exact, memory is an estimate of tensor storage only "
            "(no CUDA context, allocator caching/fragmentation or library workspaces).")

_LOSS = ("loss: logits for every position; three fp32 batch*seq*vocab buffers (log-softmax, "
         "its gradient, the logits' gradient) live at the start of the backward pass; the "
         "caller drops `outputs.logits` before backward (as the Trainer does).")

_CHECKPOINTING = ("gradient checkpointing: one non-reentrant checkpoint per decoder layer; each "
                  "layer keeps its input and one layer is recomputed at a time.")

_TOTAL = ("total = weights + adapters + gradients + optimizer state + activations + the larger "
          "of the loss buffers and the layer-backward phase (eager attention's seq^2 gradients, "
          "the recomputed layer with checkpointing), which are live at different times. "
          "Gradients count in full even though, without gradient accumulation, they build up "
          "while activations are freed (an upper bound for full fine-tuning); optimizer-step "
          "temporaries are not counted.")

_INFERENCE = ("4-bit inference: nf4 + double quantization for block linears, embeddings/head/norms "
              "in 16-bit, a bf16 KV cache for batch*seq tokens, and a prefill working set (one "
              "dequantized weight, one layer's MLP intermediates, last-position logits).")


def _assumptions(method: str, wb: int, p: int, optimizer: str, state: float, master: int,
                 lora_r: int, targets: tuple[str, ...], lora_dropout: float,
                 attn_implementation: str, padding_mask: bool,
                 gradient_checkpointing: bool) -> list[str]:
    """The plain-language assumptions of :attr:`MemoryEstimate.assumptions`."""
    dtype_name = {2: "bf16/fp16", 4: "fp32"}[wb]
    return [
        _GENERAL,
        _weights_note(method, dtype_name),
        _training_note(method, optimizer, state, master, lora_r, targets, lora_dropout),
        _activations_note(p, dtype_name, attn_implementation, padding_mask),
        _LOSS,
        _CHECKPOINTING if gradient_checkpointing else "no gradient checkpointing.",
        _TOTAL,
        _INFERENCE,
    ]


def _weights_note(method: str, dtype_name: str) -> str:
    """The assumption line on the weights."""
    return (
        f"weights: {dtype_name}"
        + (
            "; qlora: block linears in nf4 with double quantization "
            f"({NF4_BITS_PER_PARAM:.3f} bits/weight), embeddings/norms/head cast to fp32 by "
            "peft's prepare_model_for_kbit_training, plus one dequantized linear"
            if method == "qlora" else ""
        )
        + "."
    )


def _training_note(method: str, optimizer: str, state: float, master: int, lora_r: int,
                   targets: tuple[str, ...], lora_dropout: float) -> str:
    """The assumption line on what trains: gradients and optimizer state."""
    if method == "full":
        return (
            "full fine-tuning: every weight trains; gradients in the weight dtype; "
            + f"{optimizer} keeps {state:g} bytes/param of state"
            + (" plus a 4-byte fp32 master copy" if master else " (torch AdamW state takes the "
               "parameter dtype; master_weights=True models fp32 moments + master copy)")
        )
    return (
        f"{method}: frozen base, LoRA r={lora_r} on {', '.join(targets)} in every layer; "
        f"adapters, their gradients and {optimizer} state in fp32 "
        f"({4 + 4 + state:g} bytes/adapter param); lora_dropout={lora_dropout:g}"
    )


def _activations_note(p: int, dtype_name: str, attn_implementation: str,
                      padding_mask: bool) -> str:
    """The assumption line on the saved activations."""
    return (
        f"activations: hidden states in {'fp32' if p == 4 else dtype_name}, "
        + (
            "SDPA with a memory-efficient kernel (no seq^2 scores), "
            + ("K/V repeated to every head (padding mask)" if padding_mask else
               "native GQA (no padding mask; with one, transformers repeats K/V)")
            if attn_implementation == "sdpa"
            else "eager attention (fp32 softmax scores of size heads*seq^2 per layer)"
        )
        + "; RMSNorm keeps an fp32 copy of its input; SwiGLU keeps gate, SiLU(gate), up and "
        "the down_proj input."
    )
