"""Plots at the end of every stage and ``llamatune report``."""

import json

import pytest
from conftest import make_recipe, metrics_rows

from llamatune.cli import main as cli

pytest.importorskip("matplotlib")


def _png(path):
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_finished_run_has_its_plots_and_report_redraws_them(tmp_path, tiny_model_dir,
                                                              alpaca_file, capsys):
    recipe = make_recipe(tmp_path, tiny_model_dir, alpaca_file)
    assert cli(["sft", str(recipe), "train.max_steps=4", "train.eval_every=2"]) == 0
    run = tmp_path / "run"
    assert _png(run / "plots" / "loss.png")
    assert "plots: loss.png" in capsys.readouterr().out
    (run / "plots" / "loss.png").unlink()
    assert cli(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "sft, 4 steps, finished" in out and "eval_loss" in out and _png(run / "plots" /
                                                                            "loss.png")
    assert cli(["report", str(run), "--json"]) == 0
    fig = json.loads(capsys.readouterr().out)
    rows = metrics_rows(run)
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert fig["eval_loss"]["first"] == evals[0] and fig["eval_loss"]["last"] == evals[-1]
    assert fig["steps"] == 4 and fig["finished"]


def test_stage_plots_name_their_figures(tmp_path):
    from llamatune.plots import plot_run

    run = tmp_path / "ppo"
    run.mkdir()
    (run / "config.yaml").write_text("stage: ppo\n")
    rows = [{"step": 0, "eval_reward": 0.1, "eval_accuracy": 0.1}]
    rows += [{"step": i, "loss": 0.1, "reward_mean": i / 10, "kl": i / 5, "kl_k3": i / 6,
              "response_len": 20 - i} for i in range(1, 11)]
    rows += [{"step": 10, "eval_reward": 0.9, "eval_accuracy": 0.9}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{torn")
    names = sorted(p.name for p in plot_run(run))
    assert names == ["kl.png", "loss.png", "response_len.png", "reward.png"]
    assert all(_png(run / "plots" / n) for n in names)
    assert list((run / "plots").glob(".*")) == []
    from llamatune.report import key_figures

    fig = key_figures(run)
    assert fig["reward_first_fifth"] == pytest.approx(0.15)
    assert fig["reward_last_fifth"] == pytest.approx(0.95)
    assert fig["max_kl"] == pytest.approx(2.0) and not fig["finished"]
    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "config.yaml").write_text("stage: rm\n")
    (rm / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5, "accuracy": 0.5}) + "\n"
                                      + json.dumps({"step": 1, "eval_accuracy": 0.75,
                                                    "eval_margin": 1.0}) + "\n")
    assert sorted(p.name for p in plot_run(rm)) == ["accuracy.png", "loss.png", "margin.png"]


def test_run_stage_reads_any_config_yaml(tmp_path):
    """The stage comes from the run's config.yaml, unvalidated; an unreadable one gives None."""
    from llamatune.plots import run_stage

    assert run_stage(tmp_path) is None
    for text, stage in ((b"stage: rm\nnot_a_key: 1\n", "rm"), (b"", None), (b"- 1\n", None),
                        (b"a: [x\n", None), (b"\xff\xfe", None), (b"train: {}\n", None)):
        (tmp_path / "config.yaml").write_bytes(text)
        assert run_stage(tmp_path) == stage


def test_report_errors(tmp_path, capsys):
    assert cli(["report", str(tmp_path)]) == 2
    assert "holds no run" in capsys.readouterr().err
