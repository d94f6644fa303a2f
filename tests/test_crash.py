"""Crash safety, a contract for every stage: kill -9 at a random moment, resume, same run.

Also: a resume whose recipe remaps the data order is refused (naming what changed) unless
``resume_accept_changes`` is set, and a NaN loss stops the run before its update is applied,
keeping the last good checkpoint.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import make_recipe, metrics_rows, write_jsonl
from test_reward import _cfg_sections, _pairs

from llamatune import training
from llamatune.cli import main as cli
from llamatune.config import load_config
from llamatune.errors import UserError
from llamatune.rundir import latest_checkpoint

STEPS = 24
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _loss_rows(run):
    rows = metrics_rows(run)
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _stage_recipe(stage, root, model_dir, alpaca_file):
    common = dict(train={"max_steps": STEPS, "save_every": 1, "keep_checkpoints": 2, "lr": 1e-2},
                  lora={"dropout": 0.1}, model={"dtype": "float32"})
    if stage == "sft":
        return make_recipe(root, model_dir, alpaca_file, **common)
    if stage == "ppo":
        from test_ppo import _prompts, _reward_file

        root.mkdir(parents=True, exist_ok=True)
        reward = f"{_reward_file(root)}:starts_with_t"
        return make_recipe(root, model_dir, _prompts(root), stage="ppo",
                           data={"format": "prompts", "template": "chatml", "eval_split": 0},
                           ppo={"reward_fn": reward, "rollout_batch": 4, "k": 2,
                                "max_new_tokens": 6, "sample_every": 0}, **common)
    sections = _cfg_sections(**common)
    sections["stage"] = stage  # rm or dpo: both train on preference pairs
    root.mkdir(parents=True, exist_ok=True)
    return make_recipe(root, model_dir, write_jsonl(root / "pref.jsonl", _pairs()), **sections)


def _kill_at_random_moment(argv, run, seed):
    """Start the stage in its own process and SIGKILL it somewhere in the middle of the run."""
    rng = random.Random(seed)
    after = rng.randint(3, STEPS - 6)
    proc = subprocess.Popen([sys.executable, "-m", "llamatune", *argv], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count('"loss"') >= after:
            time.sleep(rng.uniform(0, 0.05))
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    err = proc.communicate()[1].decode()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill: {err}"
    return after


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "ppo"])
def test_kill_9_then_resume_gives_every_loss_row_of_an_uninterrupted_run(
        stage, tmp_path, tiny_model_dir, alpaca_file):
    straight = _stage_recipe(stage, tmp_path / "straight", tiny_model_dir, alpaca_file)
    assert cli([stage, str(straight)]) == 0
    want = _loss_rows(tmp_path / "straight" / "run")
    assert len(want) == STEPS

    recipe = _stage_recipe(stage, tmp_path / "killed", tiny_model_dir, alpaca_file)
    run = tmp_path / "killed" / "run"
    # LLAMATUNE_KILL_SEED picks other moments (the suite's are fixed, so it is repeatable).
    seed = int(os.environ.get("LLAMATUNE_KILL_SEED", len(stage)))
    _kill_at_random_moment([stage, str(recipe)], run, seed)
    assert not (run / "adapter_model.safetensors").exists()
    assert latest_checkpoint(run) is not None
    assert cli([stage, str(recipe), "resume=true"]) == 0
    got = _loss_rows(run)
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [x for _, x in got] == pytest.approx([x for _, x in want], abs=1e-6)
    assert not list(run.glob(".checkpoint-*")), "a torn checkpoint is cleaned up"


def test_resume_refuses_a_changed_data_order(tmp_path, tiny_model_dir, alpaca_file, capsys):
    recipe = make_recipe(tmp_path, tiny_model_dir, alpaca_file, model={"dtype": "float32"},
                         train={"max_steps": 6, "save_every": 2})
    assert cli(["sft", str(recipe), "train.max_steps=3"]) == 0  # "crashed" after checkpoint-2
    run = tmp_path / "run"
    (run / "adapter_model.safetensors").unlink()
    before = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert cli(["sft", str(recipe), "resume=true", "train.batch_size=2", "train.seed=7"]) == 2
    err = capsys.readouterr().err
    assert "train.batch_size was 4, now 2" in err and "train.seed was 42, now 7" in err
    assert "resume_accept_changes=true" in err and "Traceback" not in err
    rows = [dict(r, instruction=r["instruction"] + " please") for r in
            map(json.loads, alpaca_file.read_text().splitlines())]
    write_jsonl(alpaca_file, rows)
    assert cli(["sft", str(recipe), "resume=true"]) == 2
    assert "the training data (data.path's rows" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == before, "a refused resume changes nothing"
    assert cli(["sft", str(recipe), "resume=true", "resume_accept_changes=true"]) == 0
    assert [s for s, _ in _loss_rows(run)] == [1, 2, 3, 4, 5, 6]


def test_nan_loss_stops_before_the_update(tmp_path, tiny_model_dir, alpaca_file, monkeypatch,
                                          capsys):
    import torch
    from safetensors.torch import load_file

    from llamatune.recipes import sft

    path = make_recipe(tmp_path, tiny_model_dir, alpaca_file, model={"dtype": "float32"},
                       train={"max_steps": 6, "save_every": 1}, data={"eval_split": 0})
    recipe = sft.SFTRecipe(load_config(path), str(path))
    calls = {"n": 0}
    real = recipe.loss

    def poisoned(batch):  # the third micro-batch's loss is NaN
        calls["n"] += 1
        loss, figures = real(batch)
        return (loss * float("nan"), figures) if calls["n"] == 3 else (loss, figures)

    monkeypatch.setattr(recipe, "loss", poisoned)
    recipe.setup()
    with pytest.raises(training.TrainingDiverged) as e:
        recipe.train()
    msg = str(e.value)
    assert "diverged at step 3: loss nan" in msg and "checkpoint-2" in msg
    assert isinstance(e.value, UserError)
    run = tmp_path / "run"
    assert [s for s, _ in _loss_rows(run)] == [1, 2]
    assert not (run / "adapter_model.safetensors").exists()
    # The model still holds step 2's weights: the NaN step changed nothing.
    saved = load_file(str(run / "checkpoint-2" / "adapter_model.safetensors"))
    live = {k: v for k, v in recipe.model.state_dict().items() if "lora_" in k}
    assert len(saved) == len(live)
    for k, v in saved.items():
        match = [name for name in live if name.replace(".default", "") == k]
        assert match and torch.equal(live[match[0]], v), k
    # Resuming at a lower lr continues from the last good checkpoint.
    assert cli(["sft", str(path), "resume=true", "train.lr=1e-3"]) == 0
    rows = metrics_rows(run)
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert sorted(lrs) == [1, 2, 3, 4, 5, 6] and lrs[3] < 1e-3 + 1e-12 < lrs[2]


def test_nan_through_the_cli_is_one_paragraph(tmp_path, tiny_model_dir, alpaca_file, capsys):
    recipe = make_recipe(tmp_path, tiny_model_dir, alpaca_file, train={"max_steps": 3,
                                                                       "lr": float("inf")})
    # An infinite learning rate is refused up front; a huge one diverges at the second step.
    assert cli(["sft", str(recipe)]) == 2
    assert "train.lr must be a number" in capsys.readouterr().err
    assert cli(["sft", str(recipe), "train.lr=1e30", "train.max_grad_norm=0",
                "train.warmup_steps=0"]) == 2
    err = capsys.readouterr().err
    assert "training diverged at step" in err and "Traceback" not in err
    assert "No checkpoint was written before it" in err
