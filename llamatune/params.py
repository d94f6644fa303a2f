"""Exact parameter counts and first-principles memory estimates for Llama-family models.

Everything here is arithmetic on a Hugging Face ``config.json``-style dict, so this module
imports without torch; ``llamatune params`` and ``llamatune estimate`` answer in milliseconds
for architectures far too large for the machine they run on.

Parameter count (exact, equal to ``sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())``):
with ``h`` hidden size, ``a`` heads, ``k`` key/value heads, ``d`` head dim, ``m`` MLP size,
``V`` vocabulary and ``L`` layers, one layer holds ``q,o: h*a*d`` and ``k,v: h*k*d`` attention
weights (plus ``a*d + 2*k*d + h`` biases with ``attention_bias``), ``3*h*m`` SwiGLU weights
(plus ``2*m + h`` with ``mlp_bias``) and ``2*h`` RMSNorm weights; the model adds ``V*h``
embeddings, a final ``h`` norm and a ``V*h`` head unless tied. A LoRA adapter of rank ``r`` on a
linear of shape ``in -> out`` adds ``r*(in + out)``.

Training memory is weights + LoRA adapters + gradients + optimizer state + saved activations
+ the larger of two transient phases (the loss buffers at the start of the backward pass, or
one layer's backward). The activation figures count, tensor by tensor, what the autograd graph
of ``transformers``' ``LlamaDecoderLayer`` (and peft's LoRA layers) keeps for the backward pass;
the tests check them byte-exactly against ``torch.autograd.graph.saved_tensors_hooks`` and the
whole step against the measured peak. Per token and per layer, in bytes, with ``p`` the
activation dtype size (the weight dtype; 4 for QLoRA, whose non-quantized weights peft's
``prepare_model_for_kbit_training`` casts to float32, so the hidden states are float32) and
``c = 4`` the LoRA adapter dtype (peft keeps adapters in float32):

* each RMSNorm: ``4*h + 4`` (the float32 input and its ``rsqrt``), plus ``p*h`` (the normalized
  tensor) when the norm weight trains; the first layer's input norm saves nothing under LoRA,
  whose frozen embeddings produce no gradient;
* the inputs of the linears: ``p*in`` once per input shared by trainable base weights (full
  fine-tuning); under LoRA, per adapted linear, ``c*in`` for the adapter's input (shared once
  between the linears that read the same tensor when ``p == c``; a separate float32 copy per
  adapter when ``p != c``, since peft casts the input to the adapter dtype), ``c*r`` for the
  rank-``r`` intermediate, and with LoRA dropout another ``c*in`` (the dropout output) plus
  the dropout mask (1 byte per element on CUDA, a ``c``-byte noise tensor on CPU);
* attention, SDPA (flash / memory-efficient kernels): ``p*(2*a*d + 2*k*d)`` for Q, K, V and
  the output (GQA handled natively, K/V not repeated) and ``4*a`` for the log-sum-exp; the
  ``o_proj`` input is a view of the saved output. Eager: ``3*p*a*d`` (Q, and K/V repeated to
  all heads), ``4*a*s`` for the float32 softmax probabilities (plus ``p*a*s`` for their cast
  when ``p != 4``) and a separate ``o_proj`` input;
* SwiGLU MLP: ``3*p*m`` (gate output for SiLU, SiLU output and up output for the product),
  plus the ``down_proj`` input per the linear-input rule above.

(Tensors are saved only when the gradient they serve is needed, so, e.g., a LoRA layer whose
input does not require grad saves no dropout mask.) For the default model (SmolLM2-135M, fp32,
LoRA r=16 on all linears, SDPA) this is 40,428 bytes per token per layer without dropout and
69,612 with dropout 0.05 on CPU; for Llama-2-7B in bf16, 274,504 and 310,088 on CUDA, more than
half of it the float32 copies and dropout outputs of the adapter inputs.

Outside the layers: the final norm, the RoPE cos/sin tables, the token ids (full fine-tuning)
and the loss targets. The loss buffers (``logits`` in the estimate) are three float32
``batch*seq*vocab`` tensors live at the start of the backward pass: the log-softmax output saved
by the forward, its gradient and the gradient of the logits. They are freed before the first
layer's backward, where eager attention holds ``(4 + p)*a*s`` bytes of score and probability
gradients per token beyond what the layer's MLP block has freed (SDPA's buffers stay below that
block). With gradient checkpointing (one non-reentrant checkpoint per decoder layer, as
``transformers`` does it) each layer keeps only its ``p*h`` input and one layer at a time is
recomputed, after the loss buffers are gone.

Optimizer state follows llamatune's loop, ``torch.optim.AdamW`` on the trainable tensors: two
moments in the dtype of those tensors (float32 adapters; the weight dtype for full fine-tuning),
or, with ``master_weights=True``, float32 moments plus a float32 master copy (mixed-precision
recipes that keep 16-bit weights).
"""

from __future__ import annotations

__all__ = [
    "ARCHITECTURES",
    "GB",
    "LINEAR_MODULES",
    "PUBLISHED_4BIT_INFERENCE_GB",
    "MemoryEstimate",
    "ParamBreakdown",
    "count_parameters",
    "estimate_memory",
    "lora_parameters",
    "resolve_architecture",
    "run_estimate",
    "run_params",
]

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llamatune.errors import UserError

GB = 10**9
"""Bytes in the GB printed by the tables (decimal, like GPU spec sheets)."""

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The linear layers of a Llama block, in order; ``all-linear`` means all of them."""

NF4_BITS_PER_PARAM = 4 + 8 / 64 + 32 / (64 * 256)
"""nf4 with double quantization: 4 bits per weight, an 8-bit absmax per 64-weight block and a
float32 absmax per 256 such blocks (bitsandbytes' defaults): about 4.127 bits."""

PUBLISHED_4BIT_INFERENCE_GB = {"llama-2-7b": 5.5, "llama-2-13b": 8.9, "llama-2-70b": 37.6}
"""Commonly quoted GPU memory for 4-bit Llama-2 inference, for comparison."""

_DEFAULT_MODEL = "smollm2-135m-instruct"


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

_ALIASES = {"llama-30b": "llama-33b", "llama-1-7b": "llama-7b", "llama-1-13b": "llama-13b",
            "llama-1-33b": "llama-33b", "llama-1-30b": "llama-33b", "llama-1-65b": "llama-65b",
            "smollm2-135m": "smollm2-135m-instruct"}


# --------------------------------------------------------------------------------------------
# Parameter counts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Dims:
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


_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "intermediate_size")


def _as_dict(config: Any) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):  # a transformers PretrainedConfig
        return config.to_dict()
    raise TypeError(f"expected a config dict, got {type(config).__name__}")


def _dims(config: Any) -> _Dims:
    cfg = _as_dict(config)
    missing = [k for k in _REQUIRED if cfg.get(k) is None]
    if missing:
        raise UserError(
            f"the model config lacks {', '.join(missing)}; a Llama-style config.json "
            f"needs {', '.join(_REQUIRED)} (num_key_value_heads and head_dim are optional)."
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
    d = _dims(config)
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


def _targets(target_modules: str | Iterable[str] | None) -> tuple[str, ...]:
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
    config: Mapping[str, Any], r: int, target_modules: str | Iterable[str] | None = "all-linear"
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
    d = _dims(config)
    lin = d.linears()
    return d.layers * sum(r * (lin[n][0] + lin[n][1]) for n in _targets(target_modules))


# --------------------------------------------------------------------------------------------
# Resolving a target to an architecture
# --------------------------------------------------------------------------------------------


def _normalize(name: str) -> str:
    s = name.strip().lower().replace("_", "-").replace(" ", "-")
    s = s.rsplit("/", 1)[-1]
    s = re.sub(r"^meta-", "", s)
    s = re.sub(r"^llama(\d)", r"llama-\1", s)  # llama2-13b -> llama-2-13b
    return s


def _builtin(name: str) -> str | None:
    s = _normalize(name)
    stripped = s
    for suffix in ("-hf", "-chat", "-instruct", "-base"):  # Llama-2-13b-chat-hf -> llama-2-13b
        stripped = stripped.removesuffix(suffix)
    for c in (s, stripped):
        c = _ALIASES.get(c, c)
        if c in ARCHITECTURES:
            return c
    return None


def _unknown(name: str) -> UserError:
    return UserError(
        f"unknown model {name!r}. Built-in architectures: {', '.join(ARCHITECTURES)} "
        "(variants such as Llama-2-13B or llama2-13b work too). A path to a config.json, a "
        "model folder containing config.json, a .gguf file or a recipe YAML also works."
    )


def _read_json(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable JSON config ({e}).") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: a config.json must hold a JSON object.")
    if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]  # multimodal wrappers keep the language model here
    _dims(cfg)  # validate now so the error names the file
    return cfg


def _read_gguf(path: Path) -> dict:
    """A ``config.json``-style dict from a GGUF file's metadata (no tensors are read)."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - any failure means "not a readable GGUF"
        raise UserError(f"{path}: not a readable GGUF file ({e}).") from None

    def get(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        return f.contents() if f is not None else default

    arch = get("general.architecture", "llama")
    vocab = get(f"{arch}.vocab_size") or len(get("tokenizer.ggml.tokens", []))
    hidden, heads = get(f"{arch}.embedding_length"), get(f"{arch}.attention.head_count")
    cfg = {
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": get(f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get(f"{arch}.attention.head_count_kv", heads),
        "intermediate_size": get(f"{arch}.feed_forward_length"),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "attention_bias": any(t.name.endswith("attn_q.bias") for t in reader.tensors),
        "mlp_bias": any(t.name.endswith("ffn_up.bias") for t in reader.tensors),
        "max_position_embeddings": get(f"{arch}.context_length"),
    }
    head_dim = get(f"{arch}.attention.key_length") or get(f"{arch}.rope.dimension_count")
    if head_dim and hidden and heads and head_dim != hidden // heads:
        cfg["head_dim"] = head_dim
    _dims(cfg)
    return cfg


def _from_hf_cache(repo_id: str) -> Path | None:
    """``config.json`` of a hub id already in the local Hugging Face cache, if any."""
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface"), "hub"
    )
    snaps = Path(hub) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    found = sorted(snaps.glob("*/config.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    return found[0] if found else None


def _recipe_model(path: Path) -> tuple[str, dict]:
    """``(model.path, the whole recipe)`` from a recipe YAML."""
    import yaml

    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"recipe {path}: not readable YAML ({e}).") from None
    if not isinstance(recipe, dict):
        raise UserError(f"recipe {path}: a recipe must be a YAML mapping of sections to keys.")
    model = recipe.get("model") or {}
    if not isinstance(model, dict):
        raise UserError(f"recipe {path}: `model` must be a mapping.")
    return str(model.get("path") or _DEFAULT_MODEL), recipe


def _resolve(target: str) -> tuple[str, dict, dict | None]:
    """``(name, config, recipe-or-None)``."""
    text = str(target).strip()
    if not text:
        raise _unknown(text)
    p = Path(text).expanduser()
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.is_file():
            raise UserError(
                f"{p} is a folder without config.json; give a Hugging Face model folder, a "
                f"config.json, a .gguf file, a recipe YAML or a built-in name "
                f"({', '.join(ARCHITECTURES)})."
            )
        return str(p), _read_json(cfg), None
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix in (".yaml", ".yml"):
            model_path, recipe = _recipe_model(p)
            inner = Path(model_path).expanduser()
            if not inner.is_absolute() and not inner.exists() and (p.parent / inner).exists():
                model_path = str(p.parent / inner)  # relative to the recipe
            if Path(model_path).suffix.lower() in (".yaml", ".yml"):
                raise UserError(f"recipe {p}: model.path {model_path} is another recipe.")
            name, cfg, _ = _resolve(model_path)
            return name, cfg, recipe
        if suffix == ".gguf":
            return str(p), _read_gguf(p), None
        return str(p), _read_json(p), None
    builtin = _builtin(text)
    if builtin is not None:
        return builtin, dict(ARCHITECTURES[builtin]), None
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        cached = _from_hf_cache(text)
        if cached is not None:
            return text, _read_json(cached), None
    if "/" not in text and not text.endswith((".yaml", ".yml", ".json", ".gguf")):
        try:  # a shipped recipe name, as `llamatune sft` accepts
            from llamatune.shipped import list_recipes

            shipped = list_recipes().get(text)
        except Exception:  # noqa: BLE001 - no shipped recipes is just "unknown"
            shipped = None
        if shipped is not None:
            return _resolve(str(shipped))
    raise _unknown(text)


def resolve_architecture(name_or_path: str) -> tuple[str, dict]:
    """Turn a model reference into ``(display name, config dict)``.

    Accepted, in order: a model folder containing ``config.json``; a ``config.json`` (any JSON
    file); a ``.gguf`` file (its metadata); a recipe YAML (its ``model.path``, resolved in
    turn, relative paths also tried from the recipe's folder); a built-in name, case-insensitive
    and tolerant of spelling variants (``Llama-2-13B``, ``llama2-13b``,
    ``meta-llama/Llama-2-13b-chat-hf``); a hub id already in the local Hugging Face cache; a
    shipped recipe name.

    Args:
        name_or_path: What the user typed.

    Returns:
        The display name (built-in name, or the path) and the config dict.

    Raises:
        UserError: Nothing matches; the message lists the built-in names.
    """
    name, cfg, _ = _resolve(name_or_path)
    return name, cfg


# --------------------------------------------------------------------------------------------
# Memory estimate
# --------------------------------------------------------------------------------------------

_OPTIMIZERS = {
    # name -> (states per trainable parameter, fixed bytes per parameter or None for "states
    # in the parameter's dtype")
    "adamw": (2, None),  # exp_avg + exp_avg_sq, zeros_like(param)
    "adamw_torch": (2, None),
    "adamw_8bit": (2, 1 + 4 / 2048),  # uint8 states, a float32 absmax per 2048-block
    "paged_adamw_8bit": (2, 1 + 4 / 2048),
    "sgd": (0, None),
}

_DTYPES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


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


def _norm_bytes(h: int, r_in: bool, full: bool, p: int) -> tuple[int, bool]:
    """Saved bytes per token of one RMSNorm, and whether its output requires grad."""
    saved = (4 * h + 4 if r_in else 0) + (p * h if full else 0)
    return saved, r_in or full


def _linear_inputs_bytes(
    n_in: int,
    x_grad: bool,
    names: tuple[str, ...],
    *,
    full: bool,
    targets: tuple[str, ...],
    p: int,
    r: int,
    dropout: float,
    on_cuda: bool,
    input_already_saved: bool = False,
) -> int:
    """Saved bytes per token for the linears that read one shared input of width ``n_in``."""
    c = 4  # peft keeps LoRA adapters in float32 (autocast_adapter_dtype)
    saved = 0
    shared_saved = input_already_saved
    if full and not shared_saved:
        saved += p * n_in  # the input, for the weight gradient
        shared_saved = True
    for name in names:
        if name not in targets:
            continue
        if dropout > 0:
            saved += c * n_in  # dropout output, the input of lora_A
            if x_grad:
                saved += (1 if on_cuda else c) * n_in  # bool mask (CUDA) / float noise (CPU)
        elif p != c:
            saved += c * n_in  # peft casts the input to the adapter dtype: one copy per adapter
        elif not shared_saved:
            saved += c * n_in
            shared_saved = True
        saved += c * r  # lora_A output, the input of lora_B
    return saved


def _layer_bytes(
    d: _Dims,
    seq: int,
    *,
    input_grad: bool,
    full: bool,
    targets: tuple[str, ...],
    p: int,
    r: int,
    dropout: float,
    on_cuda: bool,
    eager: bool,
    repeat_kv: bool,
) -> tuple[int, bool, int]:
    """Saved bytes per token of one decoder layer.

    Returns:
        The bytes, whether the layer output requires grad, and the bytes saved by the MLP
        block alone (post-attention norm onwards).
    """
    h, m, a = d.hidden, d.mlp, d.heads
    kw = dict(full=full, targets=targets, p=p, r=r, dropout=dropout, on_cuda=on_cuda)
    total, r_n1 = _norm_bytes(h, input_grad, full, p)
    total += _linear_inputs_bytes(h, r_n1, ("q_proj", "k_proj", "v_proj"), **kw)
    r_q, r_k, r_v = (r_n1 or full or t in targets for t in ("q_proj", "k_proj", "v_proj"))
    attn_grad = r_q or r_k or r_v
    out_saved = False
    if attn_grad:
        if eager:
            # Q @ K^T keeps Q for K's gradient and K for Q's; softmax keeps its fp32 output;
            # probs @ V keeps V for the probabilities' gradient and the probabilities (their
            # cast copy when p != 4) for V's.
            scores = r_q or r_k
            total += p * d.q_dim * (r_k + r_q + scores) + 4 * a * seq * scores
            total += p * a * seq * r_v if p != 4 else 0
        else:
            kv = d.q_dim if repeat_kv else d.kv_dim
            total += p * (2 * d.q_dim + 2 * kv) + 4 * a
            out_saved = True  # o_proj's input is a view of the saved SDPA output
    total += _linear_inputs_bytes(d.q_dim, attn_grad, ("o_proj",), **kw,
                                  input_already_saved=out_saved)
    r_h1 = input_grad or attn_grad or full or "o_proj" in targets
    norm2, r_n2 = _norm_bytes(h, r_h1, full, p)
    mlp_block = norm2 + _linear_inputs_bytes(h, r_n2, ("gate_proj", "up_proj"), **kw)
    r_gate = r_n2 or full or "gate_proj" in targets
    r_up = r_n2 or full or "up_proj" in targets
    # SiLU keeps the gate output; the product keeps SiLU(gate) and up.
    mlp_block += p * m * (2 * r_gate + r_up)
    mlp_block += _linear_inputs_bytes(m, r_gate or r_up, ("down_proj",), **kw)
    out_grad = r_h1 or r_gate or r_up or full or "down_proj" in targets
    return total + mlp_block, out_grad, mlp_block


def _activation_bytes(
    d: _Dims,
    batch: int,
    seq: int,
    *,
    full: bool,
    targets: tuple[str, ...],
    p: int,
    r: int,
    dropout: float,
    on_cuda: bool,
    eager: bool,
    repeat_kv: bool,
    checkpointing: bool,
) -> tuple[int, int, int, int]:
    """Activation bytes for a batch.

    Returns:
        Saved activations (loss excluded), one full layer, the loss buffers, and the backward
        workspace of one layer beyond what that layer has already freed.
    """
    tokens = batch * seq
    kw = dict(full=full, targets=targets, p=p, r=r, dropout=dropout, on_cuda=on_cuda,
              eager=eager, repeat_kv=repeat_kv)
    # Under LoRA the frozen embeddings produce a hidden state without grad; with checkpointing
    # llamatune calls enable_input_require_grads(), so every layer input requires grad.
    first, grad, _ = _layer_bytes(d, seq, input_grad=full or checkpointing, **kw)
    rest, _, mlp_block = _layer_bytes(d, seq, input_grad=True, **kw)
    if d.layers > 1:
        grad = True
    if checkpointing:
        # Each layer keeps its input; one layer at a time is recomputed in the backward pass.
        layers = d.layers * p * d.hidden + max(first, rest)
    else:
        layers = first + (d.layers - 1) * rest
    final, _ = _norm_bytes(d.hidden, grad, full, p)
    if full:
        final += p * d.hidden + 8  # lm_head input; token ids for the embedding gradient
    final += 8  # the shifted targets, kept by the loss
    rope = 2 * seq * d.head_dim * p  # cos/sin, shared by all layers
    saved = tokens * (layers + final) + rope
    # The backward pass starts with three float32 batch x seq x vocab tensors: the log-softmax
    # output (saved by the forward), its gradient and the gradient of the logits.
    loss = 3 * 4 * tokens * d.vocab
    # Eager attention's backward holds the gradients of the fp32 scores and of the
    # probabilities (4 + p bytes per head and key position) once the layer's MLP block has
    # freed its saved tensors; SDPA's backward buffers are smaller than that block.
    workspace = max(0, (4 + p) * d.heads * seq - mlp_block) if eager else 0
    return saved, tokens * rest, loss, tokens * workspace


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
    lora_r: int = 16,
    weight_dtype_bytes: int = 2,
    optimizer: str = "adamw",
    *,
    target_modules: str | Iterable[str] | None = "all-linear",
    lora_dropout: float = 0.0,
    attn_implementation: str = "sdpa",
    device: str = "cuda",
    padding_mask: bool = False,
    master_weights: bool = False,
) -> MemoryEstimate:
    """Estimate the peak memory of a training step and of 4-bit inference.

    The training total is weights + adapters + gradients + optimizer state + saved activations
    + loss buffers (see the module docstring for the activation formula and
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
    if method not in ("full", "lora", "qlora"):
        raise UserError(f"method must be full, lora or qlora, got {method!r}.")
    if batch <= 0 or seq <= 0:
        raise UserError(f"batch and seq must be positive, got batch={batch}, seq={seq}.")
    if weight_dtype_bytes not in (2, 4):
        raise UserError(f"weight_dtype_bytes must be 2 or 4, got {weight_dtype_bytes}.")
    if optimizer not in _OPTIMIZERS:
        raise UserError(f"unknown optimizer {optimizer!r}; choose among {', '.join(_OPTIMIZERS)}.")
    if attn_implementation not in ("sdpa", "eager"):
        raise UserError(f"attn_implementation must be sdpa or eager, got {attn_implementation!r}.")
    if not 0.0 <= lora_dropout < 1.0:
        raise UserError(f"lora_dropout must be in [0, 1), got {lora_dropout}.")
    d = _dims(config)
    pc = count_parameters(config)
    full = method == "full"
    r = 0 if full else lora_r
    targets = () if full else _targets(target_modules)
    adapter_params = 0 if full else lora_parameters(config, lora_r, targets)
    on_cuda = not str(device).startswith("cpu")
    wb = weight_dtype_bytes
    # llamatune prepares 4-bit models with peft's prepare_model_for_kbit_training, which casts
    # every non-quantized weight to float32; the hidden states then stay float32 too.
    p = 4 if method == "qlora" else wb
    other_bytes = 4 if method == "qlora" else wb

    if method == "qlora":
        lin = d.linears()
        largest = max(i * o for i, o, _ in lin.values())
        weights = (
            round(pc.linear_weights * NF4_BITS_PER_PARAM / 8)
            + other_bytes * (pc.total - pc.linear_weights)
            + wb * largest  # one layer dequantized at a time for the matmul
        )
    else:
        weights = wb * pc.total
    adapters = 4 * adapter_params
    trainable = pc.total if full else adapter_params
    gradients = (wb if full else 4) * trainable
    n_states, fixed = _OPTIMIZERS[optimizer]
    param_bytes = wb if full else 4
    master = 4 if (full and master_weights and wb < 4 and n_states) else 0
    per_state = fixed if fixed is not None else (4 if master else param_bytes)
    state = n_states * per_state
    optimizer_state = round((state + master) * trainable)

    kw = dict(full=full, targets=targets, p=p, r=r, dropout=0.0 if full else lora_dropout,
              on_cuda=on_cuda, eager=attn_implementation == "eager", repeat_kv=padding_mask)
    act_plain, per_layer, logits, workspace = _activation_bytes(
        d, batch, seq, checkpointing=False, **kw)
    act_ckpt = _activation_bytes(d, batch, seq, checkpointing=True, **kw)[0]
    activations = act_ckpt if gradient_checkpointing else act_plain
    # The loss buffers are freed before the first layer's backward (and, with checkpointing,
    # before its recomputation): count the larger of the two phases.
    if gradient_checkpointing:
        peak_activations = activations - per_layer + max(logits, per_layer + workspace)
    else:
        peak_activations = activations + max(logits, workspace)
    total = weights + adapters + gradients + optimizer_state + peak_activations

    dtype_name = {2: "bf16/fp16", 4: "fp32"}[wb]
    assumptions = [
        "GB = 10^9 bytes; counts are exact, memory is an estimate of tensor storage only "
        "(no CUDA context, allocator caching/fragmentation or library workspaces).",
        f"weights: {dtype_name}"
        + (
            "; qlora: block linears in nf4 with double quantization "
            f"({NF4_BITS_PER_PARAM:.3f} bits/weight), embeddings/norms/head cast to fp32 by "
            "peft's prepare_model_for_kbit_training, plus one dequantized linear"
            if method == "qlora" else ""
        )
        + ".",
        (
            "full fine-tuning: every weight trains; gradients in the weight dtype; "
            + f"{optimizer} keeps {state:g} bytes/param of state"
            + (" plus a 4-byte fp32 master copy" if master else " (torch AdamW state takes the "
               "parameter dtype; master_weights=True models fp32 moments + master copy)")
        ) if full else (
            f"{method}: frozen base, LoRA r={lora_r} on {', '.join(targets)} in every layer; "
            f"adapters, their gradients and {optimizer} state in fp32 "
            f"({4 + 4 + state:g} bytes/adapter param); lora_dropout={lora_dropout:g}"
        ),
        f"activations: hidden states in {'fp32' if p == 4 else dtype_name}, "
        + (
            "SDPA with a memory-efficient kernel (no seq^2 scores), "
            + ("K/V repeated to every head (padding mask)" if padding_mask else
               "native GQA (no padding mask; with one, transformers repeats K/V)")
            if attn_implementation == "sdpa"
            else "eager attention (fp32 softmax scores of size heads*seq^2 per layer)"
        )
        + "; RMSNorm keeps an fp32 copy of its input; SwiGLU keeps gate, SiLU(gate), up and "
        "the down_proj input.",
        "loss: logits for every position; three fp32 batch*seq*vocab buffers (log-softmax, "
        "its gradient, the logits' gradient) live at the start of the backward pass; the "
        "caller drops `outputs.logits` before backward (as the Trainer does).",
        (
            "gradient checkpointing: one non-reentrant checkpoint per decoder layer; each "
            "layer keeps its input and one layer is recomputed at a time."
        ) if gradient_checkpointing else "no gradient checkpointing.",
        "total = weights + adapters + gradients + optimizer state + activations + the larger "
        "of the loss buffers and the layer-backward phase (eager attention's seq^2 gradients, "
        "the recomputed layer with checkpointing), which are live at different times. "
        "Gradients count in full even though, without gradient accumulation, they build up "
        "while activations are freed (an upper bound for full fine-tuning); optimizer-step "
        "temporaries are not counted.",
        "4-bit inference: nf4 + double quantization for block linears, embeddings/head/norms "
        "in 16-bit, a bf16 KV cache for batch*seq tokens, and a prefill working set (one "
        "dequantized weight, one layer's MLP intermediates, last-position logits).",
    ]
    return MemoryEstimate(
        method=method,
        batch=batch,
        seq=seq,
        gradient_checkpointing=bool(gradient_checkpointing),
        weight_dtype_bytes=wb,
        activation_dtype_bytes=p,
        lora_r=r,
        optimizer=optimizer,
        parameters=pc.total,
        trainable_params=trainable,
        weights=weights,
        adapters=adapters,
        gradients=gradients,
        optimizer_state=optimizer_state,
        activations=activations,
        activations_no_checkpointing=act_plain,
        activations_checkpointing=act_ckpt,
        per_layer_activations=per_layer,
        logits=logits,
        backward_workspace=workspace,
        total=total,
        inference_4bit=_inference_4bit(d, pc, batch, seq),
        assumptions=assumptions,
    )


# --------------------------------------------------------------------------------------------
# The `llamatune params` and `llamatune estimate` commands
# --------------------------------------------------------------------------------------------


def _gb(n: float) -> str:
    return f"{n / GB:,.2f} GB"


def _shape_line(cfg: dict) -> str:
    d = _dims(cfg)
    return (
        f"vocab {d.vocab:,} · hidden {d.hidden:,} · layers {d.layers} · heads {d.heads} "
        f"(kv {d.kv_heads}) · head_dim {d.head_dim} · mlp {d.mlp:,} · "
        f"tied embeddings {'yes' if d.tied else 'no'}"
        + (" · attention bias" if d.attention_bias else "")
        + (" · mlp bias" if d.mlp_bias else "")
    )


def run_params(target: str, as_json: bool = False) -> int:
    """Print the exact parameter count of an architecture (``llamatune params``).

    Args:
        target: A built-in name, ``config.json``, model folder, ``.gguf`` or recipe YAML.
        as_json: Print one JSON object instead of a table.

    Returns:
        The exit code, 0.

    Raises:
        UserError: The target cannot be resolved.
    """
    name, cfg = resolve_architecture(target)
    pc = count_parameters(cfg)
    lora = {str(r): lora_parameters(cfg, r) for r in (8, 16, 64)}
    if as_json:
        print(json.dumps({
            "name": name,
            "builtin": name in ARCHITECTURES,
            "config": {k: cfg[k] for k in (*_REQUIRED, "num_key_value_heads", "head_dim",
                                          "tie_word_embeddings", "attention_bias", "mlp_bias")
                       if k in cfg},
            "parameters": pc.as_dict(),
            "lora_all_linear": lora,
        }, indent=2))
        return 0
    rows = [("embeddings", pc.embeddings), ("attention", pc.attention), ("mlp", pc.mlp),
            ("norms", pc.norms), ("lm_head" + (" (tied)" if not pc.lm_head else ""), pc.lm_head),
            ("total", pc.total)]
    width = len(f"{pc.total:,}")
    print(f"{name}{'  (built-in)' if name in ARCHITECTURES else ''}")
    print(f"  {_shape_line(cfg)}")
    print()
    print(f"  {'component':<18}{'parameters':>{width + 2}}{'share':>9}")
    for label, n in rows:
        print(f"  {label:<18}{n:>{width + 2},}{100 * n / pc.total:>8.1f}%")
    print()
    print(f"  per layer ({pc.num_layers} layers): attention {pc.per_layer_attention:,} · "
          f"mlp {pc.per_layer_mlp:,} · norms {pc.per_layer_norms:,} · "
          f"total {pc.per_layer_total:,}")
    print("  LoRA on all linear layers: " + " · ".join(
        f"r={r}: {n:,} ({100 * n / pc.total:.2f}%)" for r, n in lora.items()))
    return 0


def _recipe_settings(recipe: dict | None) -> dict[str, Any]:
    """Estimate settings a recipe pins down, llamatune's defaults where it is silent."""
    out: dict[str, Any] = {"method": "lora", "batch": 1, "seq": 512, "lora_r": 16,
                           "lora_dropout": 0.05, "target_modules": "all-linear",
                           "attn_implementation": "sdpa", "gradient_checkpointing": False,
                           "weight_dtype_bytes": 2, "notes": []}
    if recipe is None:
        return out
    model, lora, train = (recipe.get(k) if isinstance(recipe.get(k), dict) else {}
                          for k in ("model", "lora", "train"))
    out.update(batch=4, seq=512, lora_r=16)  # llamatune's TrainConfig / LoraConfig defaults
    if model.get("attn_implementation") in ("sdpa", "eager"):
        out["attn_implementation"] = model["attn_implementation"]
    if isinstance(model.get("gradient_checkpointing"), bool):
        out["gradient_checkpointing"] = model["gradient_checkpointing"]
    if model.get("dtype") in _DTYPES:
        out["weight_dtype_bytes"] = _DTYPES[model["dtype"]]
    if lora.get("enabled") is False:
        out["method"] = "full"
    elif model.get("quantization") == "4bit":
        out["method"] = "qlora"
    elif model.get("quantization") == "8bit":
        out["notes"].append("the recipe loads the base in 8-bit, which is not modelled: "
                            "estimated as a 16-bit LoRA base")
    if isinstance(lora.get("dropout"), (int, float)):
        out["lora_dropout"] = float(lora["dropout"])
    if lora.get("target_modules"):
        out["target_modules"] = lora["target_modules"]
    if isinstance(lora.get("r"), int):
        out["lora_r"] = lora["r"]
    if isinstance(train.get("batch_size"), int):
        out["batch"] = train["batch_size"]
    if isinstance(train.get("max_length"), int):
        out["seq"] = train["max_length"]
    return out


def run_estimate(
    target: str,
    method: str | None = None,
    batch: int | None = None,
    seq: int | None = None,
    gradient_checkpointing: bool | None = None,
    lora_r: int | None = None,
    as_json: bool = False,
    *,
    weight_dtype_bytes: int | None = None,
    lora_dropout: float | None = None,
    optimizer: str = "adamw",
    device: str = "cuda",
) -> int:
    """Print a training and 4-bit inference memory estimate (``llamatune estimate``).

    Every argument left ``None`` comes from the recipe when ``target`` is one: ``method`` from
    ``model.quantization``/``lora.enabled``, ``batch`` from ``train.batch_size``, ``seq`` from
    ``train.max_length``, ``lora_r`` from ``lora.r``, and ``model.gradient_checkpointing``,
    ``model.dtype``, ``model.attn_implementation``, ``lora.dropout``,
    ``lora.target_modules``; otherwise from llamatune's defaults (LoRA r=16 with dropout 0.05
    on all linear layers, batch 1, seq 512, bf16 weights, SDPA, no checkpointing).

    Args:
        target: A built-in name, ``config.json``, model folder, ``.gguf`` or recipe YAML.
        method: ``full``, ``lora`` or ``qlora``.
        batch: Sequences per micro-batch.
        seq: Tokens per sequence.
        gradient_checkpointing: Recompute each layer in the backward pass.
        lora_r: Adapter rank.
        as_json: Print one JSON object instead of a table.
        weight_dtype_bytes: 2 (bf16/fp16) or 4 (fp32).
        lora_dropout: LoRA dropout probability.
        optimizer: See :func:`estimate_memory`.
        device: ``cuda`` or ``cpu`` (LoRA dropout mask size).

    Returns:
        The exit code, 0.

    Raises:
        UserError: The target cannot be resolved or an argument is out of range.
    """
    name, cfg, recipe = _resolve(target)
    s = _recipe_settings(recipe)

    def pick(value: Any, key: str) -> Any:
        return s[key] if value is None else value

    method, batch, seq = pick(method, "method"), pick(batch, "batch"), pick(seq, "seq")
    ckpt = bool(pick(gradient_checkpointing, "gradient_checkpointing"))
    est = estimate_memory(
        cfg, method, batch, seq, ckpt, pick(lora_r, "lora_r"),
        pick(weight_dtype_bytes, "weight_dtype_bytes"),
        optimizer,
        target_modules=s["target_modules"],
        lora_dropout=pick(lora_dropout, "lora_dropout"),
        attn_implementation=s["attn_implementation"],
        device=device,
    )
    est.assumptions.extend(s["notes"])
    if recipe is not None:
        est.assumptions.append(f"settings not given on the command line come from the recipe "
                               f"{target}.")
    if as_json:
        print(json.dumps({"name": name, **est.as_dict()}, indent=2))
        return 0
    other = est.activations_checkpointing if not ckpt else est.activations_no_checkpointing
    what = (f"lora r={est.lora_r}" if method == "lora" else
            f"qlora (nf4) r={est.lora_r}" if method == "qlora" else "full fine-tuning")
    print(f"{name} · {what} · batch {batch} × seq {seq} · "
          f"{'fp32' if est.weight_dtype_bytes == 4 else 'bf16'} · {est.optimizer} · "
          f"gradient checkpointing {'on' if ckpt else 'off'}")
    print(f"  {est.parameters:,} parameters, {est.trainable_params:,} trainable "
          f"({100 * est.trainable_params / est.parameters:.2f}%)")
    print()
    rows = [
        ("weights", est.weights, ""),
        ("LoRA adapters", est.adapters, ""),
        ("gradients", est.gradients, ""),
        ("optimizer state", est.optimizer_state, ""),
        ("activations", est.activations,
         f"{'with' if not ckpt else 'without'} checkpointing: {_gb(other)}; "
         f"{_gb(est.per_layer_activations)} per layer"),
        ("logits / loss", est.logits, "3 fp32 batch×seq×vocab buffers"),
    ]
    print("  training")
    for label, n, note in rows:
        print(f"    {label:<18}{_gb(n):>12}" + (f"   ({note})" if note else ""))
    print(f"    {'total':<18}{_gb(est.total):>12}")
    print()
    inf = est.inference_4bit
    print(f"  4-bit inference (nf4 + double quantization, batch {batch} × {seq} tokens)")
    for key, label in (("linear_weights_4bit", "linear weights"),
                       ("quant_constants", "quant constants"),
                       ("weights_16bit", "16-bit weights"), ("kv_cache", "KV cache (bf16)"),
                       ("overhead", "working set"), ("total", "total")):
        print(f"    {label:<18}{_gb(inf[key]):>12}")
    if name in PUBLISHED_4BIT_INFERENCE_GB:
        print(f"    {'(commonly quoted':<18}{PUBLISHED_4BIT_INFERENCE_GB[name]:>9.2f} GB)")
    print()
    print("  assumptions")
    for a in est.assumptions:
        print(f"    - {a}")
    return 0
