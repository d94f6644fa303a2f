"""Merging a LoRA run into standalone weights: exact equivalence, a peft-free folder, failures."""

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import WORDS, make_recipe, write_jsonl

from llamatune import merge
from llamatune.cli import main as cli
from llamatune.config import load_config
from llamatune.errors import UserError
from llamatune.recipes.sft import SFTRecipe

MESSAGES = [{"role": "user", "content": "tell me about the sky"}]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    """A finished fp32 LoRA run on the tiny model, trained hard enough to move the logits."""
    import random

    root = tmp_path_factory.mktemp("lora-run")
    rng = random.Random(3)
    rows = [{"instruction": f"tell me about {rng.choice(WORDS)}", "input": "",
             "output": f"sure it is {rng.choice(WORDS)}"} for _ in range(24)]
    data = write_jsonl(root / "data.jsonl", rows)
    # data.cache off: module fixtures run before the per-test cache isolation. dtype pinned:
    # `auto` is bf16 on CPUs with native bf16, which would turn the exact check into a loose one.
    path = make_recipe(root, tiny_model_dir, data, model={"dtype": "float32"},
                       train={"max_steps": 3, "lr": 5e-2}, data={"cache": False, "eval_split": 4})
    recipe = SFTRecipe(load_config(path), str(path))
    recipe.setup()
    recipe.train()
    recipe.cleanup()
    return root / "run"


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits


def _prompt_ids(run):
    import torch
    from transformers import AutoTokenizer

    from llamatune.data.templates import render

    tok = AutoTokenizer.from_pretrained(str(run))
    r = render(tok, "alpaca", MESSAGES + [{"role": "assistant", "content": "sure it is blue"}])
    return torch.tensor([r.input_ids])


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if ".merging-" in p.name]


def test_fp32_merge_equals_base_plus_adapter(lora_run, tiny_model_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert cli(["merge", str(lora_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max |logit difference|" in printed and "perplexity" in printed
    assert "passed" in printed and "eval split" in printed

    # Checked independently of llamatune: plain transformers vs transformers + peft.
    ids = _prompt_ids(lora_run)
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    base_logits = _logits(base, ids)
    unmerged = PeftModel.from_pretrained(base, str(lora_run)).eval()
    diff = (_logits(merged, ids) - _logits(unmerged, ids)).abs().max().item()
    moved = (_logits(merged, ids) - base_logits).abs().max().item()
    assert diff < 1e-4
    assert moved > 1e-2, "the adapter must change the model, or the check proves nothing"

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["pad_token_id"] is not None
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [config["eos_token_id"]] and gen["pad_token_id"] is not None
    record = json.loads((out / "llamatune_merge.json").read_text())
    assert record["verification"]["passed"] and record["verification"]["check"]["kind"] == "logits"
    assert record["verification"]["max_logit_diff"] < 1e-4
    assert not _leftovers(tmp_path)


BLOCKED_LOAD = textwrap.dedent("""
    import importlib.util, json, sys

    class _Hide:
        # Wraps every finder so peft and llamatune look uninstalled (find_spec -> None).
        def __init__(self, inner):
            self.inner = inner
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ("peft", "llamatune"):
                return None
            return self.inner.find_spec(name, path, target)
        def __getattr__(self, attr):
            return getattr(self.inner, attr)

    sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
    for name in ("peft", "llamatune"):
        try:
            __import__(name)
            raise SystemExit(name + " is still importable")
        except ImportError:
            pass
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, conversations = sys.argv[1], json.loads(sys.argv[2])
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    texts = []
    for messages in conversations:
        texts.append(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    ids = tok(texts[0], add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert not [m for m in sys.modules if m.partition(".")[0] in ("peft", "llamatune")]
    print(json.dumps({"texts": texts, "eos": model.generation_config.eos_token_id}))
""")


def test_merged_folder_loads_without_peft_or_llamatune(lora_run, tmp_path):
    from transformers import AutoTokenizer

    from llamatune.data.templates import render, stop_token_ids

    out = tmp_path / "merged"
    assert merge.run_merge(str(lora_run), str(out), verify=False) == 0
    conversations = [MESSAGES, [{"role": "system", "content": "be short"}] + MESSAGES,
                     [{"role": "user", "content": "tell me about it", "input": "the sky"}]]
    # cwd elsewhere: from the checkout, `import llamatune` would find the source tree.
    proc = subprocess.run([sys.executable, "-c", BLOCKED_LOAD, str(out), json.dumps(conversations)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    tok = AutoTokenizer.from_pretrained(str(lora_run))
    for messages, text in zip(conversations, got["texts"]):
        assert text == render(tok, "alpaca", messages, add_generation_prompt=True).text
    assert got["eos"] == stop_token_ids(tok, "alpaca")


def test_bf16_merge_is_checked_with_a_bf16_tolerance(lora_run, tmp_path, capsys):
    from safetensors import safe_open

    out = tmp_path / "merged"
    assert cli(["merge", str(lora_run), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert "bfloat16 rounding" in capsys.readouterr().out
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}
    record = json.loads((out / "llamatune_merge.json").read_text())
    assert record["verification"]["check"]["kind"] == "perplexity"


def test_existing_out_is_refused_and_untouched(lora_run, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli(["merge", str(lora_run), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"


def test_failed_verification_leaves_nothing(lora_run, tmp_path, monkeypatch, capsys):
    import torch

    real = merge.build_merged_model

    def corrupted(*args, **kwargs):
        model = real(*args, **kwargs)
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.add_(0.05)
        return model

    monkeypatch.setattr(merge, "build_merged_model", corrupted)
    out = tmp_path / "merged"
    assert cli(["merge", str(lora_run), "--out", str(out)]) != 0
    captured = capsys.readouterr()
    assert "FAILED" in captured.out
    assert "does not reproduce" in captured.err and "Nothing was written" in captured.err
    assert not out.exists() and not _leftovers(tmp_path)


def test_not_a_run_dir(tmp_path, tiny_model_dir, lora_run, capsys):
    with pytest.raises(UserError, match="not a folder"):
        merge.run_merge(str(tmp_path / "missing"), str(tmp_path / "out"))
    with pytest.raises(UserError, match="not a finished llamatune run"):
        merge.run_merge(str(tiny_model_dir), str(tmp_path / "out"))
    assert cli(["merge", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "config.yaml" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_verification_without_the_data_says_how_to_skip(lora_run, tmp_path):
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["path"] = str(tmp_path / "gone.jsonl")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(UserError, match="--no-verify"):
        merge.run_merge(str(run), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)
    assert merge.run_merge(str(run), str(tmp_path / "out"), verify=False) == 0


def test_choose_check_rules():
    exact = merge.choose_check("none", "original", "float32", "float32")
    assert (exact.kind, exact.tolerance) == ("logits", 1e-4)
    q4 = merge.choose_check("4bit", "dequantized", "float32", "float32")
    assert (q4.kind, q4.tolerance) == ("perplexity", 0.005)
    assert merge.choose_check("4bit", "original", "float32", "float32").kind == "report"
    bf16 = merge.choose_check("none", "original", "float32", "bfloat16")
    assert bf16.kind == "perplexity" and bf16.tolerance == pytest.approx(0.02)
    assert merge.choose_check("4bit", "dequantized", "bfloat16", "float32").tolerance == \
        pytest.approx(0.025)
    assert merge.choose_check("8bit", "dequantized", "float32", "float32").tolerance == 0.03


def test_chat_template_problem_names_the_difference(lora_run):
    from transformers import AutoTokenizer

    from llamatune.data.jinja import to_jinja

    tok = AutoTokenizer.from_pretrained(str(lora_run))
    assert merge.chat_template_problem(tok, "alpaca", None) is None
    tok.chat_template = to_jinja(tok, "vicuna")
    problem = merge.chat_template_problem(tok, "alpaca", None)
    assert problem and "USER:" in problem and "### Instruction" in problem


def test_merge_a_dpo_run_from_another_directory(tmp_path, tiny_model_dir, monkeypatch):
    """Any stage's run merges, verified on its own data; the run's paths are absolute."""
    from test_reward import _pairs

    work = tmp_path / "work"
    work.mkdir()
    write_jsonl(work / "pref.jsonl", _pairs())
    recipe = make_recipe(work, tiny_model_dir, "pref.jsonl", stage="dpo",  # a relative path
                         model={"dtype": "float32"}, train={"max_steps": 3, "lr": 5e-2},
                         data={"format": "preference", "template": "chatml", "eval_split": 4})
    monkeypatch.chdir(work)
    assert cli(["dpo", str(recipe)]) == 0
    cfg = load_config(work / "run" / "config.yaml")
    assert cfg.stage == "dpo" and cfg.data.path == str(work / "pref.jsonl")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "merged"
    assert cli(["merge", str(work / "run"), "--out", str(out)]) == 0
    record = json.loads((out / "llamatune_merge.json").read_text())["verification"]
    assert record["passed"] and record["source"] == "eval split" and record["tokens"] > 0


def test_merge_refuses_a_reward_model(tmp_path, tiny_model_dir, capsys):
    from test_reward import _cfg_sections, _pairs

    data = write_jsonl(tmp_path / "pref.jsonl", _pairs())
    recipe = make_recipe(tmp_path, tiny_model_dir, data, **_cfg_sections())
    assert cli(["rm", str(recipe)]) == 0
    capsys.readouterr()
    assert cli(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "m")]) == 2
    assert "is a `rm` run; merge" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def _verify_figures(text: str) -> list[tuple[str, str, str]]:
    """``(max logit difference, verdict, samples digest)`` of every merge check in ``text``."""
    import re

    diffs = re.findall(r"max \|logit difference\|\s+(\S+)", text)
    verdicts = re.findall(r"check\s+max logit difference <= .*: (\w+)", text)
    digests = re.findall(r"token ids sha256 (\w+)", text)
    assert len(diffs) == len(verdicts) == len(digests), text
    return list(zip(diffs, verdicts, digests))


def test_merge_and_export_checks_repeat_exactly(lora_run, tmp_path, capsys):
    """Issue 20: the same run gives the same verdict and figure however often, at any thread
    count, and whatever autocast the caller left on: both sides are computed the same way."""
    import torch

    threads = torch.get_num_threads()
    records, printed = [], ""
    try:
        for i, (n, autocast) in enumerate([(threads, False), (1, False), (threads, True)]):
            torch.set_num_threads(n)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                assert cli(["merge", str(lora_run), "--out", str(tmp_path / f"m{i}")]) == 0
            records.append(json.loads((tmp_path / f"m{i}" / "llamatune_merge.json")
                                      .read_text())["verification"])
            printed += capsys.readouterr().out
        for i in range(2):
            assert cli(["export", str(lora_run), "--gguf", str(tmp_path / f"e{i}.gguf")]) == 0
            printed += capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
    figures = _verify_figures(printed)
    assert len(figures) == 5 and len(set(figures)) == 1, figures
    assert figures[0][1] == "passed"
    assert {(r["max_logit_diff"], r["passed"], r["setup"]["samples_sha256"], tuple(r["setup"]
            ["worst"])) for r in records} == {(records[0]["max_logit_diff"], True,
                                               records[0]["setup"]["samples_sha256"],
                                               tuple(records[0]["setup"]["worst"]))}
    setup = records[0]["setup"]
    assert "plain transformers" in setup["merged"] and "peft LoRA" in setup["reference"]
    assert "dropout off" in setup["reference"] and setup["threads"] == threads
    assert "base+adapter" in printed and "both sides in float64" in printed


def test_check_refuses_a_side_not_computed_plainly(lora_run, tiny_model_dir):
    import torch

    from llamatune._merge_check import check_plain, plain_reference
    from llamatune.config import ModelConfig
    from llamatune.fused import install

    ref = plain_reference(str(tiny_model_dir), lora_run, model_cfg=ModelConfig(),
                          attn_implementation="sdpa")
    check_plain(ref, torch.float32, "base + adapter")  # plain, eval, float32: accepted
    with pytest.raises(RuntimeError, match="training mode"):
        check_plain(ref.train(), torch.float32, "base + adapter")
    ref.eval()
    with pytest.raises(RuntimeError, match="float32 parameters, not torch.float64"):
        check_plain(ref, torch.float64, "base + adapter")
    install(ref)
    with pytest.raises(RuntimeError, match="fused forward"):
        check_plain(ref, torch.float32, "base + adapter")
