"""PNG plots of a run's ``metrics.jsonl``, drawn at the end of every stage and by ``report``.

Which figures a run gets depends on its stage (read from its ``config.yaml``):

* every stage: ``loss.png`` (training loss per step, and ``eval_loss`` where there is one);
* ``rm``: ``accuracy.png`` (pair accuracy, training and held-out) and ``margin.png``;
* ``dpo``: ``reward_accuracy.png`` and ``reward_margin.png`` (implicit rewards, training and
  held-out);
* ``ppo``: ``reward.png`` (sampled reward per iteration; greedy held-out reward/accuracy),
  ``kl.png`` (KL to the reference, k1 and k3) and ``response_len.png``.

Plots go to ``RUN_DIR/plots/``, each written under a temporary name and renamed, with the
non-interactive Agg backend (no display needed). A series too short to draw is skipped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from llamatune.rundir import read_run_config

__all__ = ["FIGURES", "plot_run", "read_metrics", "run_stage"]

FIGURES = {
    "common": [("loss.png", "loss", [("loss", "train"), ("eval_loss", "held-out")])],
    "rm": [("accuracy.png", "pair accuracy", [("accuracy", "train"), ("eval_accuracy", "held-out")]),
           ("margin.png", "reward margin (chosen - rejected)",
            [("margin", "train"), ("eval_margin", "held-out")])],
    "dpo": [("reward_accuracy.png", "implicit reward accuracy",
             [("reward_accuracy", "train"), ("eval_reward_accuracy", "held-out")]),
            ("reward_margin.png", "implicit reward margin",
             [("reward_margin", "train"), ("eval_reward_margin", "held-out")])],
    "ppo": [("reward.png", "reward", [("reward_mean", "sampled (mean)"),
                                      ("eval_reward", "held-out, greedy"),
                                      ("eval_accuracy", "held-out accuracy, greedy")]),
            ("kl.png", "KL to the reference (per answer)", [("kl", "k1"), ("kl_k3", "k3")]),
            ("response_len.png", "response length (tokens)", [("response_len", "mean")])],
}
"""Per stage: ``(file, title, [(metric key, legend label), ...])``."""


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl`` (a torn last line, from a kill, is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def run_stage(run_dir: Path) -> str | None:
    """The stage recorded in ``run_dir/config.yaml`` (``None`` if it is unreadable)."""
    cfg = read_run_config(run_dir)
    return cfg.get("stage") if cfg is not None else None


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    # Resumed runs may log a step twice: the later row wins.
    seen = {r["step"]: r[key] for r in rows if isinstance(r.get(key), (int, float))}
    steps = sorted(seen)
    return steps, [float(seen[s]) for s in steps]


def plot_run(run_dir: str | Path, stage: str | None = None) -> list[Path]:
    """Draw the run's figures into ``run_dir/plots``; return the files written.

    Args:
        run_dir: A run directory with ``metrics.jsonl``.
        stage: The stage (default: read from the run's ``config.yaml``).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    stage = stage or run_stage(run_dir)
    out_dir = run_dir / "plots"
    written = []
    step_name = "iteration" if stage == "ppo" else "step"
    for fname, title, keys in FIGURES["common"] + FIGURES.get(stage or "", []):
        series = [(label, *_series(rows, key)) for key, label in keys]
        series = [s for s in series if s[1]]
        if not series or max(len(s[1]) for s in series) < 1:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
        try:
            for label, steps, values in series:
                style = "o-" if len(steps) < 30 else "-"
                ax.plot(steps, values, style, label=label, markersize=3, linewidth=1.2)
            ax.set_title(f"{run_dir.name} ({stage or 'run'}): {title}")
            ax.set_xlabel(step_name)
            ax.grid(alpha=0.3)
            if len(series) > 1:
                ax.legend()
            fig.tight_layout()
            out_dir.mkdir(exist_ok=True)
            tmp = out_dir / f".{fname}.tmp.png"
            fig.savefig(tmp)
            os.replace(tmp, out_dir / fname)
            written.append(out_dir / fname)
        finally:
            plt.close(fig)
    return written
