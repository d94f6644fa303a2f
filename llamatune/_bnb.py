"""bitsandbytes on CPUs: keep its 4-bit inference repacking away from training, and its noise quiet.

**The upstream bug this guards against** (bitsandbytes 0.50.2, reported here for CPUs with
AVX512-BF16). ``bnb.nn.Linear4bit.forward`` repacks the layer's 4-bit weight into a CPU
inference layout (``_convert_weight_packed_for_cpu``) the first time it sees an input without
``requires_grad`` while the module is in eval mode, on such a CPU. The repacking is
permanent: the absmax statistics are rounded to bfloat16 and every later forward, training
ones included, goes through ``gemv_4bit``, which is not differentiable with respect to its
input, so the backward pass through the frozen base is lost (LoRA gradients below the top
layer come out wrong by about their own magnitude while the loss looks unchanged). An
evaluation, a PPO rollout or a reference pass would silently change training. The same
repacking asserts ("N must be divisible by block_n") or fails to reshape on layers whose
output size is not a multiple of 32 or whose input size is not a multiple of the
quantization block.

The switch bitsandbytes reads is the per-instance attribute ``support_avx512bf16_for_cpu``
(set in ``Linear4bit.__init__`` from ``has_avx512bf16()``). :func:`set_cpu_packing` sets it:
off for every model that trains (so training never runs on repacked weights, however many
no-grad forwards happen), and for inference-only models on where the layer's shape allows
the packed kernel, off elsewhere (the standard path, never an error).

bitsandbytes also logs, on import on such CPUs, that it failed to fetch an optional kernel
from a model hub ("Failed to load CPU gemm_4bit_forward from kernels-community"). llamatune
runs offline and does not need that kernel, so :func:`quiet_import_noise` filters that one
record; what the user needs to know (which 4-bit path runs) is said by :func:`describe`.
"""

from __future__ import annotations

import logging

__all__ = ["PACK_BLOCK_N", "cpu_packing_supported", "describe", "quiet_import_noise",
           "set_cpu_packing"]

PACK_BLOCK_N = 32
"""Output rows per block of bitsandbytes' CPU packed layout (its default ``block_n``)."""

_NOISY_LOGGER = "bitsandbytes.backends.cpu.ops"


def _drop_hub_kernel_notice(record: logging.LogRecord) -> bool:
    return "kernels-community" not in str(record.msg)


def quiet_import_noise() -> None:
    """Filter bitsandbytes' "could not fetch a hub kernel" warning (safe to call repeatedly).

    Must run before bitsandbytes is first imported (peft imports it whenever it is installed).
    """
    log = logging.getLogger(_NOISY_LOGGER)
    if _drop_hub_kernel_notice not in log.filters:
        log.addFilter(_drop_hub_kernel_notice)


def cpu_packing_supported() -> bool:
    """Whether bitsandbytes would repack 4-bit weights on this CPU (it has AVX512-BF16)."""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def _packable(module) -> bool:
    """Whether the packed CPU kernel takes this layer's shape (else bitsandbytes asserts)."""
    state = getattr(module.weight, "quant_state", None)
    if state is None or len(state.shape) != 2:
        return False
    n, k = state.shape
    return n % PACK_BLOCK_N == 0 and k % state.blocksize == 0


def set_cpu_packing(model, allowed: bool) -> tuple[int, int]:
    """Switch bitsandbytes' CPU inference repacking per 4-bit layer.

    Args:
        model: Any module tree; its ``bnb.nn.Linear4bit`` layers are switched.
        allowed: ``False`` for a model that trains (never repack); ``True`` for an
            inference-only model (repack where the shape allows, standard path elsewhere).

    Returns:
        ``(packed_allowed, layers)``: how many 4-bit layers may use the packed kernel, of how
        many. Always ``(0, n)`` on CPUs without AVX512-BF16.

    Raises:
        RuntimeError: ``allowed`` is false but a layer was already repacked (its absmax was
            rounded to bfloat16; it cannot be trained exactly any more).
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0, 0
    supported = None
    on = total = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        total += 1
        state = getattr(module.weight, "quant_state", None)
        if not allowed and getattr(state, "packing_format_for_cpu", False):
            raise RuntimeError("a 4-bit layer was already repacked for CPU inference; load the "
                               "model again for training")
        if supported is None:
            supported = cpu_packing_supported()
        use = bool(allowed and supported and _packable(module))
        module.support_avx512bf16_for_cpu = use
        on += use
    return on, total


def describe(packed: int, total: int, trainable: bool, device: str) -> str:
    """The 4-bit kernel path in a few plain words, for the ``model:`` line."""
    if total == 0:
        return ""
    if not device.startswith("cpu"):
        return f"bitsandbytes' {device.split(':')[0]} kernels"
    if trainable:
        why = (" (this CPU's packed AVX512-BF16 inference layout stays off: bitsandbytes would "
               "switch training to a kernel without a backward pass)"
               if _supported_quietly() else "")
        return f"bitsandbytes' standard dequantize-and-matmul path{why}"
    if packed == 0:
        return "bitsandbytes' standard dequantize-and-matmul path"
    where = "every layer" if packed == total else (
        f"{packed} of {total} layers (the standard path on the rest, whose shapes it cannot take)")
    return f"bitsandbytes' packed AVX512-BF16 inference kernel (bf16 compute) on {where}"


def _supported_quietly() -> bool:
    try:
        return cpu_packing_supported()
    except ImportError:
        return False
