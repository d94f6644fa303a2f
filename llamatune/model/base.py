"""The frozen base model in memory: :class:`Loaded` and :func:`load_base` (dtype, 4/8-bit)."""

from __future__ import annotations

from dataclasses import dataclass, field

from llamatune.config import ModelConfig
from llamatune.errors import UserError
from llamatune.model.dtypes import (
    dtype_choice,
    dtype_name,
    dtype_summary,
    resolve_device,
    resolve_dtype,
)
from llamatune.model.source import resolve_model_path
from llamatune.model.tokenizer import load_tokenizer


def bnb_config(cfg: ModelConfig, compute_dtype):
    """The bitsandbytes config for ``model.quantization`` (``None`` for ``none``)."""
    if cfg.quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(
            f"model.quantization={cfg.quantization} needs bitsandbytes: pip install bitsandbytes"
        ) from None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=compute_dtype if compute_dtype is not None else None,
    )


@dataclass
class Loaded:
    """One base model in memory, with its named adapters and scalar heads.

    Built by :func:`load_base`, :func:`add_adapter`, :func:`add_head` and :func:`finish`
    (or all at once by :func:`load_model`). Adapters share the base: one is active at a time
    (``Net(adapter=...)`` switches), so a frozen copy of a starting adapter serves as a
    reference model at the cost of the adapter alone.
    """

    model: object
    """The model (a ``PeftModel`` once an adapter is added)."""
    tokenizer: object
    """The tokenizer, pad token fixed."""
    folder: str
    """The resolved base-model folder."""
    device: str
    """Where the model lives."""
    dtype: object
    """The weight dtype of the non-quantized parts."""
    dtype_why: str = ""
    """Why that dtype was chosen (for the ``model:`` line)."""
    kernels: str = ""
    """Which 4-bit kernel path runs (empty when the base is not 4-bit)."""
    trainable: bool = True
    """Whether this model trains (k-bit preparation, gradient checkpointing, no repacking)."""
    fused: bool = True
    """``model.fused``: lean kernels for training, the chunked head loss."""
    adapters: dict = field(default_factory=dict)
    """Adapter name to whether it trains."""
    heads: dict = field(default_factory=dict)
    """Head name to :class:`ScalarHead`."""
    net: object = None
    """The :class:`llamatune.net.Net` every loss and log-prob goes through (after :func:`finish`)."""

    def describe(self, model=None) -> str:
        """The dtypes (and 4-bit path) chosen, and why, for the ``model:`` line.

        Args:
            model: The module to count trainable dtypes in (default: the net, heads included).
        """
        target = model if model is not None else (self.net or self.model)
        text = dtype_summary(target, self.dtype, self.dtype_why)
        return f"{text}; {self.kernels}" if self.kernels else text

    @property
    def trainable_adapter(self) -> str | None:
        """The name of the adapter that trains, if any."""
        return next((n for n, t in self.adapters.items() if t), None)


def load_base(mcfg: ModelConfig, *, trainable: bool = True, full: bool = False,
              cpu_4bit_packing: bool = True, seed: int | None = None) -> Loaded:
    """Load the base model and tokenizer, optionally quantized, ready for adapters and heads.

    Args:
        mcfg: The model section.
        trainable: Prepare for training (k-bit preparation, gradient checkpointing). A
            trainable 4-bit model never uses bitsandbytes' CPU inference repacking
            (:mod:`llamatune._bnb`), so no-grad forwards cannot change training.
        full: Every weight will train (full fine-tuning): ``model.dtype: auto`` loads
            float32, the dtype of trainable weights.
        cpu_4bit_packing: For an inference-only 4-bit model, allow bitsandbytes' packed
            AVX512-BF16 kernel where a layer's shape takes it (it computes in bf16; merge
            verification turns it off to compare in float32).
        seed: Seeds what is initialized randomly afterwards (adapters, heads).

    Returns:
        A :class:`Loaded` without adapters or heads.

    Raises:
        UserError: A source cannot be found or a setting cannot be honoured here.
    """
    import torch

    from llamatune import _bnb

    _bnb.quiet_import_noise()
    folder = resolve_model_path(mcfg.path)
    tokenizer = load_tokenizer(mcfg, folder)
    device = resolve_device(mcfg.device)
    if full and trainable and mcfg.dtype == "auto":
        dtype, why = torch.float32, "full fine-tuning: every weight trains, in float32"
    else:
        dtype, why = dtype_choice(mcfg.dtype, device)
    compute = dtype if mcfg.compute_dtype == "auto" else resolve_dtype(mcfg.compute_dtype, device)
    quant = bnb_config(mcfg, compute)
    kwargs = dict(
        dtype=dtype,
        trust_remote_code=mcfg.trust_remote_code,
        attn_implementation=mcfg.attn_implementation,
    )
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device if device != "cuda" else "cuda:0"}  # a 4-bit base
        # loads straight onto its device (bitsandbytes quantizes there); cuda:N under a launcher
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"model.path {mcfg.path}: the model could not be loaded ({e}).") from None
    kernels = ""
    if quant is None:
        model.to(device)
    elif mcfg.quantization == "4bit":
        packed, total = _bnb.set_cpu_packing(model, allowed=cpu_4bit_packing and not trainable)
        kernels = (f"4-bit nf4 layers compute in {dtype_name(compute)} through "
                   f"{_bnb.describe(packed, total, trainable, device)}")
    if model.config.pad_token_id is None or model.config.pad_token_id == tokenizer.eos_token_id:
        model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    if quant is not None and trainable:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=mcfg.gradient_checkpointing
        )
    elif mcfg.gradient_checkpointing and trainable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if mcfg.gradient_checkpointing and trainable:
        model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    if seed is not None:
        torch.manual_seed(seed)
    return Loaded(model=model, tokenizer=tokenizer, folder=folder, device=device, dtype=dtype,
                  dtype_why=why, kernels=kernels, trainable=trainable, fused=mcfg.fused)
