"""The ``llamatune params`` and ``llamatune estimate`` commands: what they print."""

from __future__ import annotations

import json
from typing import Any

from llamatune.config import LoraConfig, ModelConfig, TrainConfig
from llamatune.params.architectures import ARCHITECTURES, REQUIRED_KEYS, dims
from llamatune.params.counts import count_parameters, lora_parameters
from llamatune.params.memory import (
    DEFAULT_OPTIMIZER,
    GB,
    PUBLISHED_4BIT_INFERENCE_GB,
    MemoryEstimate,
    estimate_memory,
)
from llamatune.params.resolve import resolve, resolve_architecture

__all__ = ["run_estimate", "run_params"]

_DTYPES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
"""Bytes per weight of the ``model.dtype`` names."""

_AUTO_DTYPE_BYTES = 2
"""``model.dtype: auto`` (the default) on the GPUs an estimate is for: bf16."""

_NO_RECIPE_BATCH = 1
"""Sequences per micro-batch when no recipe is given (a recipe silent on it: ``TrainConfig``'s)."""


def _gb(n: float) -> str:
    return f"{n / GB:,.2f} GB"


def _shape_line(cfg: dict) -> str:
    d = dims(cfg)
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
            "config": {k: cfg[k] for k in (*REQUIRED_KEYS, "num_key_value_heads", "head_dim",
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


def _method(lora_enabled: Any, quantization: Any) -> str:
    """The estimate's method for a recipe's ``lora.enabled`` and ``model.quantization``."""
    if lora_enabled is False:
        return "full"
    return "qlora" if quantization == "4bit" else "lora"


def _recipe_settings(recipe: dict | None) -> dict[str, Any]:
    """Estimate settings a recipe pins down, llamatune's defaults where it is silent."""
    model_d, lora_d, train_d = ModelConfig(), LoraConfig(), TrainConfig()
    out: dict[str, Any] = {
        "method": _method(lora_d.enabled, model_d.quantization), "batch": _NO_RECIPE_BATCH,
        "seq": train_d.max_length, "lora_r": lora_d.r, "lora_dropout": lora_d.dropout,
        "target_modules": lora_d.target_modules,
        "attn_implementation": model_d.attn_implementation,
        "gradient_checkpointing": model_d.gradient_checkpointing,
        "weight_dtype_bytes": _DTYPES.get(model_d.dtype, _AUTO_DTYPE_BYTES), "notes": [],
    }
    if recipe is None:
        return out
    model, lora, train = (recipe.get(k) if isinstance(recipe.get(k), dict) else {}
                          for k in ("model", "lora", "train"))
    out["batch"] = train_d.batch_size  # what a recipe silent on it trains with
    if model.get("attn_implementation") in ("sdpa", "eager"):
        out["attn_implementation"] = model["attn_implementation"]
    if isinstance(model.get("gradient_checkpointing"), bool):
        out["gradient_checkpointing"] = model["gradient_checkpointing"]
    if model.get("dtype") in _DTYPES:
        out["weight_dtype_bytes"] = _DTYPES[model["dtype"]]
    out["method"] = _method(lora.get("enabled", lora_d.enabled),
                            model.get("quantization", model_d.quantization))
    if out["method"] == "lora" and model.get("quantization") == "8bit":
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
    optimizer: str = DEFAULT_OPTIMIZER,
    device: str = "cuda",
) -> int:
    """Print a training and 4-bit inference memory estimate (``llamatune estimate``).

    Every argument left ``None`` comes from the recipe when ``target`` is one: ``method`` from
    ``model.quantization``/``lora.enabled``, ``batch`` from ``train.batch_size``, ``seq`` from
    ``train.max_length``, ``lora_r`` from ``lora.r``, and ``model.gradient_checkpointing``,
    ``model.dtype``, ``model.attn_implementation``, ``lora.dropout``,
    ``lora.target_modules``; otherwise from llamatune's defaults, the config dataclasses'
    (:mod:`llamatune.config`: LoRA r=16 with dropout 0.05 on all linear layers, seq 512, SDPA,
    no checkpointing; batch ``train.batch_size`` for a recipe, else 1; bf16 weights for
    ``model.dtype: auto``).

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
    name, cfg, recipe = resolve(target)
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
    _print_estimate(name, est)
    return 0


def _print_estimate(name: str, est: MemoryEstimate) -> None:
    """The ``llamatune estimate`` table: header, training, 4-bit inference, assumptions."""
    what = (f"lora r={est.lora_r}" if est.method == "lora" else
            f"qlora (nf4) r={est.lora_r}" if est.method == "qlora" else "full fine-tuning")
    print(f"{name} · {what} · batch {est.batch} × seq {est.seq} · "
          f"{'fp32' if est.weight_dtype_bytes == 4 else 'bf16'} · {est.optimizer} · "
          f"gradient checkpointing {'on' if est.gradient_checkpointing else 'off'}")
    print(f"  {est.parameters:,} parameters, {est.trainable_params:,} trainable "
          f"({100 * est.trainable_params / est.parameters:.2f}%)")
    print()
    _print_training(est)
    print()
    _print_inference(name, est)
    print()
    print("  assumptions")
    for a in est.assumptions:
        print(f"    - {a}")


def _print_training(est: MemoryEstimate) -> None:
    """The training rows of the ``llamatune estimate`` table."""
    ckpt = est.gradient_checkpointing
    other = est.activations_checkpointing if not ckpt else est.activations_no_checkpointing
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


def _print_inference(name: str, est: MemoryEstimate) -> None:
    """The 4-bit inference rows of the ``llamatune estimate`` table."""
    inf = est.inference_4bit
    print(f"  4-bit inference (nf4 + double quantization, batch {est.batch} × {est.seq} tokens)")
    for key, label in (("linear_weights_4bit", "linear weights"),
                       ("quant_constants", "quant constants"),
                       ("weights_16bit", "16-bit weights"), ("kv_cache", "KV cache (bf16)"),
                       ("overhead", "working set"), ("total", "total")):
        print(f"    {label:<18}{_gb(inf[key]):>12}")
    if name in PUBLISHED_4BIT_INFERENCE_GB:
        print(f"    {'(commonly quoted':<18}{PUBLISHED_4BIT_INFERENCE_GB[name]:>9.2f} GB)")
