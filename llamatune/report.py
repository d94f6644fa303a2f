"""``llamatune report RUN_DIR``: a run's key figures, and its plots redrawn.

Works on a stage's run directory and on a pipeline folder (its stage folders in order).
"""

from __future__ import annotations

import json
from pathlib import Path

from llamatune.errors import UserError
from llamatune.plots import plot_run, read_metrics, run_stage

__all__ = ["key_figures", "run_report"]

_HEADLINE = {  # per stage: the held-out figure that says how the run went
    "sft": "eval_loss", "rm": "eval_accuracy", "dpo": "eval_reward_accuracy",
    "ppo": "eval_reward",
}
_EXTRA = {
    "rm": ["eval_margin"], "dpo": ["eval_reward_margin", "eval_loss"],
    "ppo": ["eval_accuracy"],
}


def _fifths(values: list[float]) -> tuple[float, float] | None:
    if len(values) < 2:
        return None
    k = max(1, len(values) // 5)
    return sum(values[:k]) / k, sum(values[-k:]) / k


def key_figures(run_dir: str | Path) -> dict:
    """The figures ``report`` prints for one run directory.

    Returns:
        ``stage``, ``steps``, ``finished``, ``last_loss``, ``alarms`` (the training-health
        alarm rows the run recorded, :mod:`llamatune.health`; for a run whose config predates
        ``train.alarms``, replayed and marked ``replayed``) and, per held-out metric,
        ``first``/``last`` values; for PPO also the sampled reward's first and last fifth and
        the largest KL.
    """
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    stage = run_stage(run_dir)
    train = [r for r in rows if "loss" in r]
    out = {"run": str(run_dir), "stage": stage, "steps": train[-1]["step"] if train else 0,
           "finished": (run_dir / "adapter_model.safetensors").is_file(),
           "last_loss": train[-1]["loss"] if train else None}
    for key in [_HEADLINE.get(stage, "eval_loss")] + _EXTRA.get(stage, []):
        vals = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if vals:
            out[key] = {"first": vals[0][1], "first_step": vals[0][0], "last": vals[-1][1],
                        "last_step": vals[-1][0]}
    out["alarms"] = _alarms(run_dir, rows, stage)
    if stage == "ppo":
        rewards = [r["reward_mean"] for r in train if "reward_mean" in r]
        f = _fifths(rewards)
        if f:
            out["reward_first_fifth"], out["reward_last_fifth"] = f
        kls = [r["kl"] for r in train if isinstance(r.get("kl"), (int, float))]
        if kls:
            out["max_kl"] = max(kls)
    return out


def _alarms(run_dir: Path, rows: list[dict], stage: str | None) -> list[dict]:
    """The alarms the run recorded; for a run from before alarms existed, replayed (marked)."""
    from llamatune.health import replay

    found = [r for r in rows if "alarm" in r]
    if found or _alarms_key(run_dir):
        return found
    return [{**a, "replayed": True} for a in replay(run_dir)]


def _alarms_key(run_dir: Path) -> bool:
    """Whether the run's ``config.yaml`` has ``train.alarms`` (it ran with the monitor)."""
    from llamatune.rundir import read_run_config

    cfg = read_run_config(run_dir) or {}
    train = cfg.get("train")
    return isinstance(train, dict) and "alarms" in train


def _describe(fig: dict) -> str:
    lines = [f"{fig['run']}  ({fig['stage'] or 'unknown stage'}, {fig['steps']} "
             f"{'iterations' if fig['stage'] == 'ppo' else 'steps'}, "
             f"{'finished' if fig['finished'] else 'not finished'})"]
    if fig["last_loss"] is not None:
        lines.append(f"  last training loss   {fig['last_loss']:.4f}")
    for key, v in fig.items():
        if isinstance(v, dict):
            lines.append(f"  {key:20s} {v['first']:.4f} (step {v['first_step']}) -> "
                         f"{v['last']:.4f} (step {v['last_step']})")
    if "reward_first_fifth" in fig:
        lines.append(f"  sampled reward       first fifth {fig['reward_first_fifth']:.4f} -> "
                     f"last fifth {fig['reward_last_fifth']:.4f}")
    if "max_kl" in fig:
        lines.append(f"  largest KL           {fig['max_kl']:.3f}")
    for a in fig.get("alarms", []):
        how = "replayed from metrics.jsonl" if a.get("replayed") else "recorded"
        lines.append(f"  ALARM {a['alarm']} at step {a['step']} ({how}): {a['message']}")
    return "\n".join(lines)


def _run_dirs(path: Path) -> list[Path]:
    if (path / "metrics.jsonl").is_file():
        return [path]
    summary = path / "summary.json"
    if summary.is_file():
        try:
            stages = json.loads(summary.read_text())["stages"]
            found = [Path(s["folder"]) for s in stages if (Path(s["folder"]) /
                                                             "metrics.jsonl").is_file()]
            if found:
                return found
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    return [p for p in (path / n for n in ("sft", "reward", "ppo", "dpo"))
            if (p / "metrics.jsonl").is_file()]


def run_report(path: str, as_json: bool = False) -> int:
    """Print the key figures of a run (or of every stage of a pipeline) and redraw its plots.

    Returns:
        The exit code (0).

    Raises:
        UserError: ``path`` holds no run.
    """
    root = Path(path).expanduser()
    runs = _run_dirs(root) if root.is_dir() else []
    if not runs:
        raise UserError(f"{path} holds no run (no metrics.jsonl there or in sft/, reward/, "
                        "ppo/); give a run directory or a pipeline folder.")
    figures = []
    for run in runs:
        fig = key_figures(run)
        fig["plots"] = [str(p) for p in plot_run(run, fig["stage"])]
        figures.append(fig)
    held = _held_out_row(root)
    if as_json:
        out = figures if len(figures) > 1 else figures[0]
        print(json.dumps({"runs": out, "held_out": held} if held else out, indent=2))
    else:
        for fig in figures:
            print(_describe(fig))
            if fig["plots"]:
                print(f"  plots: {', '.join(Path(p).name for p in fig['plots'])} in "
                      f"{Path(fig['plots'][0]).parent}")
        if held:
            print(f"held-out topics: {held['key_figure']}  ({held['folder']})")
    return 0


def _held_out_row(root: Path) -> dict | None:
    """A pipeline's held-out check, from its ``summary.json`` (``None`` when it has none)."""
    try:
        stages = json.loads((root / "summary.json").read_text())["stages"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None
    return next((s for s in stages if s.get("stage") == "held-out"), None)
