"""GGUF export: written by llamatune, read back by transformers' GGUF loader (not ours)."""

import json

import pytest
import torch
from conftest import make_recipe

from llamatune.cli import main as cli

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model folder with a ChatML chat template, as a merged run would carry."""
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("chat-model") / "m"
    shutil.copytree(tiny_model_dir, folder)
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                         "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>"
                         "assistant\n{% endif %}")
    tok.save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("kind", ["f16", "bf16", "q8_0"])
def test_export_reads_back_as_the_same_model(tmp_path, chat_model_dir, kind, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "gguf" / "model.gguf"
    assert cli(["export", str(chat_model_dir), "--gguf", str(out), "--type", kind]) == 0
    said = capsys.readouterr().out
    assert "-> PASS" in said and "tokenizer same ids" in said and "chat template same" in said
    assert out.is_file() and out.with_suffix(".Modelfile").is_file()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []
    modelfile = out.with_suffix(".Modelfile").read_text()
    assert "FROM ./model.gguf" in modelfile and 'PARAMETER stop "</s>"' in modelfile

    reader = gguf.GGUFReader(str(out))
    field = reader.fields["tokenizer.chat_template"]
    template = bytes(field.parts[field.data[0]]).decode()
    assert template == AutoTokenizer.from_pretrained(str(chat_model_dir)).chat_template
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output.weight", "blk.1.attn_q.weight",
            "blk.1.ffn_down.weight", "output_norm.weight"} <= names

    # Every weight comes back where it belongs (the q/k rope interleaving undone), at the
    # precision of the export type.
    ref = AutoModelForCausalLM.from_pretrained(str(chat_model_dir), dtype=torch.float32)
    back = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name,
                                                dtype=torch.float32)
    tol = {"f16": 1e-3, "bf16": 1e-2, "q8_0": 2e-2}[kind]
    got = back.state_dict()
    for name, w in ref.state_dict().items():
        assert torch.allclose(got[name], w, atol=tol * float(w.abs().max()), rtol=0), name
    if kind != "q8_0":
        cast = torch.float16 if kind == "f16" else torch.bfloat16
        q = ref.state_dict()["model.layers.0.self_attn.q_proj.weight"]
        assert torch.equal(got["model.layers.0.self_attn.q_proj.weight"], q.to(cast).float())


def test_a_wrong_export_is_caught_and_nothing_is_published(tmp_path, chat_model_dir,
                                                            monkeypatch, capsys):
    from llamatune import export

    monkeypatch.setattr(export, "_interleave_rope", lambda w, n_head: w)  # llama.cpp order lost
    out = tmp_path / "bad.gguf"
    assert cli(["export", str(chat_model_dir), "--gguf", str(out)]) == 2
    err = capsys.readouterr().err
    assert "does not reproduce" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_export_of_a_run_merges_first_and_checks_on_its_held_out_prompts(
        tmp_path, tiny_model_dir, alpaca_file, capsys):
    recipe = make_recipe(tmp_path, tiny_model_dir, alpaca_file)
    assert cli(["sft", str(recipe), "train.max_steps=1"]) == 0
    out = tmp_path / "run.gguf"
    capsys.readouterr()
    assert cli(["export", str(tmp_path / "run"), "--gguf", str(out), "--samples", "4"]) == 0
    said = capsys.readouterr().out
    assert "merging" in said and "eval split of" in said and "-> PASS" in said
    reader = gguf.GGUFReader(str(out))
    field = reader.fields["tokenizer.chat_template"]
    template = bytes(field.parts[field.data[0]]).decode()
    assert template == (tmp_path / "run" / "chat_template.jinja").read_text()


def test_export_errors(tmp_path, tiny_model_dir, capsys):
    assert cli(["export", str(tiny_model_dir), "--gguf", str(tmp_path / "x.bin")]) == 2
    assert ".gguf" in capsys.readouterr().err
    assert cli(["export", str(tmp_path), "--gguf", str(tmp_path / "x.gguf")]) == 2
    assert "neither a llamatune run directory" in capsys.readouterr().err
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    other = tmp_path / "mistralish"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(dict(cfg, model_type="mistral",
                                                       architectures=["MistralForCausalLM"])))
    assert cli(["export", str(other), "--gguf", str(tmp_path / "x.gguf")]) == 2
    assert "plain Llama-architecture" in capsys.readouterr().err
    assert list(tmp_path.glob("*.gguf")) == [] and list(tmp_path.glob(".*")) == []
