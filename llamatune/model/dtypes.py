"""The device and dtype policy: where the model runs and in which precision, and why.

See the package docstring (:mod:`llamatune.model`) for the policy itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from llamatune.errors import UserError


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` when a GPU is present, else ``cpu``.

    Under a launcher (``accelerate launch``, ``torchrun``) ``cuda`` means this process's own
    GPU, ``cuda:LOCAL_RANK``, so processes never pile onto the first one.
    """
    import torch

    from llamatune import dist

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"model.device is {device!r} but no CUDA GPU is visible; use auto or cpu.")
    if device == "cuda" and dist.launched():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0') or 0)}"
    return device


CPU_BF16_ENV = "LLAMATUNE_CPU_BF16"
"""``1`` or ``0`` forces llamatune's bf16 or fp32 CPU path for ``model.dtype: auto``."""


def stored_dtype(folder: str) -> str:
    """The dtype a model folder stores its floating-point weights in (``float32``, ``bfloat16`` ...).

    Read from the safetensors headers (the most common floating dtype by element count), else
    from ``config.json``; ``float32`` when neither says.
    """
    import struct

    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
    counts: dict[str, int] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
        except (OSError, ValueError, struct.error):
            continue
        for key, info in header.items():
            if key != "__metadata__" and info.get("dtype") in names:
                n = 1
                for d in info.get("shape", []):
                    n *= d
                counts[names[info["dtype"]]] = counts.get(names[info["dtype"]], 0) + n
    if counts:
        return max(counts, key=counts.get)
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    value = cfg.get("dtype") or cfg.get("torch_dtype")
    return value if isinstance(value, str) and value in names.values() else "float32"


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX).

    Without those instructions bfloat16 matmuls are emulated and run far slower than
    float32 (measured here on an AVX2-only CPU: about 100x slower), so ``auto`` keeps fp32.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def cpu_bf16_choice() -> tuple[bool, str]:
    """Whether ``model.dtype: auto`` runs the frozen base in bf16 on this CPU, and why.

    ``LLAMATUNE_CPU_BF16=1`` or ``0`` forces either path on any CPU (tests run both).

    Raises:
        UserError: The variable holds something other than 0 or 1.
    """
    env = os.environ.get(CPU_BF16_ENV, "").strip()
    if env in ("0", "1"):
        return env == "1", f"{CPU_BF16_ENV}={env}"
    if env:
        raise UserError(f"{CPU_BF16_ENV}={env!r} is not 0 or 1; unset it to let llamatune "
                        "decide from the CPU.")
    if cpu_has_fast_bf16():
        return True, "this CPU computes bf16 natively"
    return False, "this CPU has no native bf16, so fp32 is faster"


def resolve_dtype(name: str, device: str):
    """``auto``: bfloat16 on GPUs and CPUs with native bf16, float32 elsewhere."""
    return dtype_choice(name, device)[0]


def dtype_choice(name: str, device: str):
    """The torch dtype for ``model.dtype`` (or ``model.compute_dtype``) and the reason.

    Returns:
        ``(dtype, why)``; ``why`` is a few words for the ``model:`` line.
    """
    import torch

    if name != "auto":
        table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        return table[name], "as the recipe asks"
    if device.startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: this GPU computes bf16"
        return torch.float32, "auto: this GPU has no bf16"
    if device == "cpu":
        bf16, why = cpu_bf16_choice()
        return (torch.bfloat16 if bf16 else torch.float32), f"auto: {why}"
    return torch.float32, "auto"


def fp32_trainable(model) -> list[str]:
    """Give every trainable floating-point parameter float32 storage (the master weights).

    Whatever the frozen base runs in, LoRA matrices and score/value heads train in float32,
    so their AdamW moments (made like the parameters) are float32 too. peft already makes its
    LoRA matrices float32 on a bf16 base; a head copied from the base (``modules_to_save``)
    or a fully trained model would keep the base dtype without this.

    Returns:
        The names of the parameters that were cast.
    """
    import torch

    cast = []
    for name, p in model.named_parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            cast.append(name)
    return cast


def dtype_summary(model, base_dtype, why: str) -> str:
    """``base bfloat16 (auto: ...), trainable float32`` for the ``model:`` line."""
    trainable = sorted({dtype_name(p.dtype) for p in model.parameters() if p.requires_grad})
    text = f"base {dtype_name(base_dtype)} ({why})"
    if trainable:
        text += f", trainable {'/'.join(trainable)} (AdamW state alike)"
    return text


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` as ``bfloat16``."""
    return str(dtype).removeprefix("torch.")
