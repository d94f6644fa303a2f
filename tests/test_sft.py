"""The SFT stage on a tiny random Llama: what moves, what must not, resume, errors."""

import subprocess
import sys

import pytest
from conftest import make_recipe, metrics_rows

from llamatune.cli import main as cli
from llamatune.config import load_config
from llamatune.recipes.sft import SFTRecipe


def _recipe(tmp_path, tiny_model_dir, alpaca_file, **sections):
    path = make_recipe(tmp_path, tiny_model_dir, alpaca_file, **sections)
    return SFTRecipe(load_config(path), str(path))


def test_step_moves_adapter_and_not_base(tmp_path, tiny_model_dir, alpaca_file):
    import torch

    r = _recipe(tmp_path, tiny_model_dir, alpaca_file, train={"max_steps": 2})
    r.setup()
    before = {n: p.detach().clone() for n, p in r.model.named_parameters()}
    r.train()
    moved = frozen = 0
    for n, p in r.model.named_parameters():
        same = torch.equal(before[n], p.detach())
        if "lora_B" in n:  # B starts at zero, so any step moves it
            assert not same, n
            moved += 1
        elif "lora_" not in n:
            assert same and not p.requires_grad, n
            frozen += 1
    assert moved == 2 * 7 and frozen > 0
    r.cleanup()
    run = tmp_path / "run"
    for f in ("config.yaml", "metrics.jsonl", "adapter_model.safetensors",
              "adapter_config.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (run / f).exists(), f
    rows = metrics_rows(run)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert all({"loss", "lr", "tokens_per_s"} <= set(r) for r in rows if "loss" in r)
    assert any("eval_loss" in r for r in rows)


def test_loss_falls_on_tiny_model(tmp_path, tiny_model_dir, alpaca_file):
    r = _recipe(tmp_path, tiny_model_dir, alpaca_file, train={"max_steps": 30, "lr": 5e-2},
                lora={"r": 16, "alpha": 64})
    r.setup()
    r.train()
    rows = metrics_rows(tmp_path / "run")
    losses = [x["loss"] for x in rows if "loss" in x]
    q = len(losses) // 4
    assert sum(losses[-q:]) / q < 0.9 * sum(losses[:q]) / q


def test_resume_continues_exactly(tmp_path, tiny_model_dir, alpaca_file):
    def losses(run):
        rows = metrics_rows(run)
        return [x["loss"] for x in rows if "loss" in x]

    base = dict(train={"max_steps": 6, "save_every": 3}, lora={"dropout": 0.1},
                model={"dtype": "float32"})
    r = _recipe(tmp_path / "a", tiny_model_dir, alpaca_file, **base)
    r.setup()
    r.train()
    r.cleanup()
    straight = losses(tmp_path / "a" / "run")
    # Interrupted after step 3 (the checkpoint), then resumed.
    r = _recipe(tmp_path / "b", tiny_model_dir, alpaca_file, **base)
    r.setup()
    r.loop.total_steps = 4  # "crash" after one step past the checkpoint
    r.train()
    assert (tmp_path / "b" / "run" / "checkpoint-3" / "trainer_state.json").exists()
    path = make_recipe(tmp_path / "b", tiny_model_dir, alpaca_file, resume=True, **base)
    r = SFTRecipe(load_config(path), str(path))
    r.setup()
    r.train()
    r.cleanup()
    resumed = losses(tmp_path / "b" / "run")
    assert len(resumed) == 6
    assert resumed == pytest.approx(straight, abs=1e-6)


def test_cli_errors_are_one_paragraph(tmp_path, tiny_model_dir, alpaca_file, capsys):
    recipe = make_recipe(tmp_path, tiny_model_dir, alpaca_file)
    assert cli(["sft", str(recipe), "train.max_stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "train.max_stepz" in err and "train.max_steps" in err and "Traceback" not in err
    assert cli(["sft", str(recipe), f"data.path={tmp_path}/missing.jsonl"]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    assert cli(["sft", str(recipe), f"model.path={tmp_path}/nomodel"]) == 2
    assert "nomodel" in capsys.readouterr().err
    assert cli(["sft", str(recipe), f"output_dir={recipe}/sub"]) == 2
    assert "cannot be created" in capsys.readouterr().err
    assert not (tmp_path / "run").exists(), "nothing is written before the inputs are checked"


def test_cli_sft_then_generate(tmp_path, tiny_model_dir, alpaca_file, capsys):
    recipe = make_recipe(tmp_path, tiny_model_dir, alpaca_file)
    assert cli(["sft", str(recipe), "train.max_steps=2"]) == 0
    assert cli(["sft", str(recipe), "train.max_steps=2"]) == 2  # would clobber the run
    assert "already holds a run" in capsys.readouterr().err
    capsys.readouterr()
    assert cli(["generate", str(tmp_path / "run"), "--prompt", "tell me about cat",
                "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_help_is_fast_and_light():
    code = ("import sys, time; t=time.time(); from llamatune.cli import main; "
            "import contextlib, io\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: main(['--help'])\n"
            "    except SystemExit: pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\n"
            "print(time.time() - t, heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    secs, heavy = out.stdout.split(" ", 1)
    assert float(secs) < 1.0
    assert heavy.strip() == "[]"


def test_ls_cp_validate(tmp_path, tiny_model_dir, alpaca_file, capsys):
    assert cli(["ls"]) == 0
    assert "alpaca" in capsys.readouterr().out
    assert cli(["cp", "alpaca", str(tmp_path / "mine.yaml")]) == 0
    assert (tmp_path / "mine.yaml").read_text().startswith("#")
    assert cli(["cp", "alpaca", str(tmp_path / "mine.yaml")]) == 2
    assert cli(["cp", "nosuch", str(tmp_path / "x.yaml")]) == 2
    capsys.readouterr()
    recipe = make_recipe(tmp_path, tiny_model_dir, alpaca_file)
    assert cli(["validate", str(recipe)]) == 0
    assert "ok" in capsys.readouterr().out
    assert cli(["ls", "--templates"]) == 0
    assert "llama2" in capsys.readouterr().out


def test_chat_session(tmp_path, tiny_model_dir, alpaca_file, capsys, monkeypatch):
    import io

    recipe = make_recipe(tmp_path, tiny_model_dir, alpaca_file)
    assert cli(["sft", str(recipe), "train.max_steps=1"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("tell me about cat\n/reset\nhello\n/exit\n"))
    capsys.readouterr()
    assert cli(["chat", str(tmp_path / "run"), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("bot> ") == 2
