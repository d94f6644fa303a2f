"""The dtype policy on both of llamatune's CPU paths, whatever CPU runs the tests.

``LLAMATUNE_CPU_BF16=1`` forces the bf16 path that ``model.dtype: auto`` takes on CPUs with
native bf16, ``0`` the fp32 path of AVX2-only CPUs (the default for the other fast tests).
Everything here is cheap: on an AVX2-only CPU bf16 is emulated, slow but correct.
"""

import json

import pytest
import torch
from conftest import WORDS, make_recipe, metrics_rows, write_jsonl

from llamatune.cli import main as cli
from llamatune.config import ConfigError, LoraConfig, ModelConfig, load_config
from llamatune.errors import UserError
from llamatune.model import dtype_choice, load_model
from llamatune.recipes.reward import RewardRecipe
from llamatune.recipes.sft import SFTRecipe
from llamatune.score import load_reward_model


@pytest.fixture
def bf16(monkeypatch):
    monkeypatch.setenv("LLAMATUNE_CPU_BF16", "1")


def _losses(run):
    rows = metrics_rows(run)
    return [r["loss"] for r in rows if "loss" in r]


def test_auto_follows_the_switch(monkeypatch):
    monkeypatch.setenv("LLAMATUNE_CPU_BF16", "1")
    dtype, why = dtype_choice("auto", "cpu")
    assert dtype == torch.bfloat16 and "LLAMATUNE_CPU_BF16=1" in why
    monkeypatch.setenv("LLAMATUNE_CPU_BF16", "0")
    assert dtype_choice("auto", "cpu")[0] == torch.float32
    assert dtype_choice("bfloat16", "cpu") == (torch.bfloat16, "as the recipe asks")
    monkeypatch.setenv("LLAMATUNE_CPU_BF16", "yes")
    with pytest.raises(UserError, match="LLAMATUNE_CPU_BF16='yes' is not 0 or 1"):
        dtype_choice("auto", "cpu")
    monkeypatch.delenv("LLAMATUNE_CPU_BF16")
    from llamatune.model import cpu_has_fast_bf16

    want = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    assert dtype_choice("auto", "cpu")[0] == want


def test_bf16_sft_keeps_fp32_master_weights_and_states(tmp_path, tiny_model_dir, alpaca_file,
                                                       bf16, capsys):
    path = make_recipe(tmp_path / "bf16", tiny_model_dir, alpaca_file,
                       train={"max_steps": 4}, data={"eval_split": 4})
    r = SFTRecipe(load_config(path), str(path))
    r.setup()
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("model:"))
    assert "base bfloat16 (auto: LLAMATUNE_CPU_BF16=1)" in line and "trainable float32" in line
    trainable = [p for p in r.model.parameters() if p.requires_grad]
    frozen = [p for p in r.model.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert any(p.dtype == torch.bfloat16 for p in frozen)
    r.train()
    for state in r.loop.updates.optimizer.state.values():
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    # The same run on the fp32 path: the bf16 base moves each loss by bf16 rounding only.
    path32 = make_recipe(tmp_path / "fp32", tiny_model_dir, alpaca_file, model={"dtype": "float32"},
                         train={"max_steps": 4}, data={"eval_split": 4})
    r32 = SFTRecipe(load_config(path32), str(path32))
    r32.setup()
    r32.train()
    assert _losses(r.run_dir) == pytest.approx(_losses(r32.run_dir), rel=2e-2)


def _pairs():
    rows = []
    for i, t in enumerate(["cat", "dog", "sun", "moon", "water", "sky"] * 4):
        b = WORDS[i % len(WORDS)]
        rows.append({"prompt": f"tell me about {t}", "chosen": f"the {t} is {b} thanks",
                     "rejected": f"the {t} is {b} bad", "topic": t})
    return rows


def test_bf16_reward_stage_from_an_sft_run(tmp_path, tiny_model_dir, alpaca_file, bf16):
    sft = make_recipe(tmp_path / "sft", tiny_model_dir, alpaca_file, train={"max_steps": 2})
    assert cli(["sft", str(sft)]) == 0
    pref = write_jsonl(tmp_path / "pref.jsonl", _pairs())
    path = make_recipe(tmp_path / "rm", tiny_model_dir, pref, stage="rm",
                       model={"adapter": str(tmp_path / "sft" / "run")},
                       data={"format": "preference", "template": "chatml",
                             "eval_group_by": "topic", "eval_split": 2},
                       train={"max_steps": 12, "lr": 2e-2})
    r = RewardRecipe(load_config(path), str(path))
    r.setup()
    head = [(n, p) for n, p in r.net.named_parameters() if "score" in n and p.requires_grad]
    assert head and all(p.dtype == torch.float32 for _, p in head), "the score head trains in fp32"
    r.train()
    r.cleanup()
    losses = _losses(r.run_dir)
    assert sum(losses[-3:]) < sum(losses[:3])
    rm = load_reward_model(str(r.run_dir))
    conv = [{"role": "user", "content": "tell me about cat"},
            {"role": "assistant", "content": "the cat is blue thanks"}]
    worse = conv[:1] + [{"role": "assistant", "content": "the cat is blue bad"}]
    good, bad = rm.score([conv, worse])
    assert good > bad


def test_bf16_run_merges_in_the_base_checkpoint_dtype(tmp_path, tiny_model_dir, alpaca_file, bf16,
                                                      capsys):
    """An fp32 base trained on the bf16 path merges into fp32 weights equal to base + adapter."""
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    path = make_recipe(tmp_path, tiny_model_dir, alpaca_file, train={"max_steps": 3, "lr": 5e-2},
                       data={"eval_split": 4})
    assert cli(["sft", str(path)]) == 0
    run, out = tmp_path / "run", tmp_path / "merged"
    assert cli(["merge", str(run), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "saved as float32 (the base checkpoint's dtype)" in text
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.float32"}
    # Plain transformers + peft, everything in fp32, no llamatune code.
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    unmerged = PeftModel.from_pretrained(base, str(run)).eval()
    ids = torch.randint(5, 300, (2, 24))
    with torch.no_grad():
        diff = (merged(input_ids=ids).logits - unmerged(input_ids=ids).logits).abs().max()
    assert float(diff) < 1e-4


def test_bf16_qlora_trains_and_merges(tmp_path, tiny_model_dir, alpaca_file, bf16, capsys):
    pytest.importorskip("bitsandbytes")
    path = make_recipe(tmp_path, tiny_model_dir, alpaca_file, model={"quantization": "4bit"},
                       train={"max_steps": 3, "lr": 5e-2}, data={"eval_split": 4})
    assert cli(["sft", str(path)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("model:"))
    assert "4-bit nf4 layers compute in bfloat16" in line
    assert cli(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged")]) == 0
    record = json.loads((tmp_path / "merged" / "llamatune_merge.json").read_text())
    assert record["dtype"] == "float32" and record["verification"]["passed"]
    assert record["verification"]["precision"] == "float32"


def test_full_fine_tuning_trains_fp32_weights(tmp_path, tiny_model_dir, alpaca_file, bf16):
    loaded = load_model(ModelConfig(path=str(tiny_model_dir)), LoraConfig(enabled=False),
                        full=True)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    assert "full fine-tuning" in loaded.dtype_why
    path = make_recipe(tmp_path, tiny_model_dir, alpaca_file, lora={"enabled": False},
                       model={"dtype": "bfloat16"})
    with pytest.raises(ConfigError, match="model.dtype .*float32 master weights"):
        load_config(path)
