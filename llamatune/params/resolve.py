"""Turning what the user typed into an architecture config.

Accepted: a built-in name, a model folder, a ``config.json``, a ``.gguf`` file, a recipe YAML,
a hub id already in the local Hugging Face cache, or a shipped recipe name.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from llamatune.config import ConfigError, ModelConfig, read_recipe
from llamatune.errors import UserError
from llamatune.params.architectures import ALIASES, ARCHITECTURES, dims

__all__ = ["resolve", "resolve_architecture"]

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
        c = ALIASES.get(c, c)
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
    dims(cfg)  # validate now so the error names the file
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
    dims(cfg)
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
    """``(model.path, the whole recipe)`` from a recipe YAML, read as every command reads one."""
    try:
        recipe = read_recipe(path)[0]
    except ConfigError as e:  # not UTF-8, not YAML, empty or not a mapping: config says which
        raise UserError(str(e)) from None
    model = recipe.get("model") or {}
    if not isinstance(model, dict):
        raise UserError(f"recipe {path}: `model` must be a mapping.")
    return str(model.get("path") or ModelConfig().path), recipe


def resolve(target: str) -> tuple[str, dict, dict | None]:
    """Resolve a model reference as :func:`resolve_architecture` does, keeping the recipe.

    Args:
        target: What the user typed.

    Returns:
        The display name, the config dict, and the recipe mapping when ``target`` was a
        recipe (else ``None``).

    Raises:
        UserError: Nothing matches.
    """
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
            name, cfg, _ = resolve(model_path)
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
            return resolve(str(shipped))
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
    name, cfg, _ = resolve(name_or_path)
    return name, cfg

