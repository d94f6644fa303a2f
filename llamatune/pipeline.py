"""``llamatune pipeline RECIPE``: SFT -> reward model -> PPO -> merge, in one command.

A pipeline recipe says ``stage: pipeline`` and maps stage commands to stage recipes::

    stage: pipeline
    output_dir: runs/llama2_chat        # the stages go to sft/, reward/, ppo/, merged/
    model: {path: smollm2-135m-instruct}  # shared keys: every stage inherits them
    stages:
      sft: recipes/alpaca.yaml          # a stage recipe by path ...
      rm: {data: {path: ...}}           # ... or inline
      ppo: {ppo: {advantage: gae}}
    merge: {dtype: null}                # or merge: false

Each stage's config is, from weakest to strongest: the stage recipe file (when given by
path), the shared top-level keys, the stage's inline keys, the command line
(``sft.train.max_steps=5`` for one stage, ``train.seed=1`` for all). The wiring is then
added: the reward model and PPO start from the SFT run (``model.adapter``), and PPO scores
with the pipeline's reward model (``ppo.reward_model``) unless its recipe names a reward
function. Every stage's config and data are checked before the first stage starts.

A rerun is cheap: a stage whose folder holds a finished run with the same resolved config
(and whose inputs, the stages before it, did not change) is skipped; an interrupted one
resumes from its last checkpoint; one whose config changed is refused, naming the keys,
unless ``--from STAGE`` redoes the pipeline from there. A stop signal (SIGTERM, SIGINT) ends
the running stage at a step boundary with a checkpoint (:mod:`llamatune._stop`); the rerun
resumes it. At the end a table (stage, status,
wall time, key figure, folder) is printed and saved as ``OUTPUT_DIR/summary.json``.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import importlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from llamatune import _stop
from llamatune.config import (
    PIPELINE_STAGES,
    TRAIN_STAGES,
    Config,
    ConfigError,
    config_to_dict,
    flatten,
    load_config,
    read_recipe,
)
from llamatune.errors import UserError

__all__ = ["ORDER", "Plan", "check_pipeline", "plan_pipeline", "run_pipeline"]

ORDER = tuple((c, TRAIN_STAGES[c].folder, TRAIN_STAGES[c].module) for c in PIPELINE_STAGES)
"""``(command, folder, module)`` of each stage, in the order they run."""

STEPS = [c for c, _, _ in ORDER] + ["merge"]

_IGNORED = {"resume", "overwrite", "resume_accept_changes", "train.progress", "train.report_to"}
"""Keys that do not change what a stage computes (not compared on a rerun)."""


@dataclass
class Plan:
    """One stage of a pipeline, resolved."""

    command: str
    folder: Path
    cfg: Config
    recipe_path: str
    module: str


def _split_overrides(items: list[str]) -> tuple[dict, dict[str, dict]]:
    from llamatune.config import parse_overrides

    shared, per_stage = {}, {c: {} for c, _, _ in ORDER}
    per_stage["merge"] = {}
    for key, val in parse_overrides(items).items():
        head, _, rest = key.partition(".")
        if head in per_stage and rest:
            per_stage[head][rest] = val
        else:
            shared[key] = val
    return shared, per_stage


def plan_pipeline(path: str, overrides: list[str] | None = None) -> tuple[list[Plan], dict, Path]:
    """Read and check a pipeline recipe: every stage's config, resolved and validated.

    Returns:
        ``(plans, merge options or None, output_dir)``.

    Raises:
        ConfigError: A bad key anywhere (naming the recipe, stage and key).
        UserError: Not a pipeline recipe, or a stage recipe for another stage.
    """
    raw, lines = read_recipe(path)
    if raw.get("stage") != "pipeline":
        raise UserError(f"{path} is not a pipeline recipe (it has stage: {raw.get('stage')}); "
                        f"run it with `llamatune {raw.get('stage') or 'sft'} {path}`, or add "
                        "stage: pipeline and a stages: mapping.")
    stages = raw.pop("stages", None)
    raw.pop("stage")
    merge = raw.pop("merge", {})
    if not isinstance(stages, dict) or not stages:
        raise ConfigError(f"{path}:{lines.get('stages', 1)}: stages must map stage commands "
                          f"({', '.join(c for c, _, _ in ORDER)}) to a recipe path or mapping")
    unknown = [k for k in stages if k not in {c for c, _, _ in ORDER}]
    if unknown:
        raise ConfigError(f"{path}: stages.{unknown[0]} is not a pipeline stage; the stages are "
                          f"{', '.join(c for c, _, _ in ORDER)} (they run in that order)")
    if merge is True or merge is None:
        merge = {}
    if merge is not False and not isinstance(merge, dict):
        raise ConfigError(f"{path}: merge must be a mapping (dtype:, base:) or false")
    shared_cli, per_stage = _split_overrides(overrides or [])
    if merge is not False:
        merge = {**merge, **per_stage.pop("merge")}
        bad = [k for k in merge if k not in ("dtype", "base", "samples")]
        if bad:
            raise ConfigError(f"{path}: merge.{bad[0]} is not a merge option (dtype, base, "
                              "samples)")
    shared = {**flatten(raw), **shared_cli}
    out_dir = Path(str(shared.pop("output_dir", "runs/pipeline"))).expanduser()
    here = Path(path).parent
    plans: list[Plan] = []
    folders = {c: out_dir / f for c, f, _ in ORDER}
    for command, _folder, module in ORDER:
        if command not in stages:
            continue
        base, inline, recipe_path = _stage_values(path, lines, command, stages[command], here)
        values = {**base, **shared, **inline, **per_stage[command]}
        explicit = set(inline) | set(per_stage[command])
        if command in ("rm", "ppo") and "sft" in stages and "model.adapter" not in explicit:
            values["model.adapter"] = str(folders["sft"])
        if command == "ppo" and "rm" in stages and not values.get("ppo.reward_fn") \
                and "ppo.reward_model" not in explicit:
            values["ppo.reward_model"] = str(folders["rm"])
        values.update(stage=command, output_dir=str(folders[command]))
        cfg = load_config(None, values, label=f"{path} stages.{command}: ")
        plans.append(Plan(command, folders[command], cfg, recipe_path, module))
    return plans, merge, out_dir


def _stage_values(path, lines: dict, command: str, spec, here: Path) -> tuple[dict, dict, str]:
    """One ``stages.COMMAND`` entry: a recipe file's values, inline values, the recipe path.

    Raises:
        ConfigError: The entry is neither a recipe path nor a mapping, or its file is missing.
        UserError: The file is a recipe for another stage.
    """
    if spec is None:
        return {}, {}, str(path)
    if isinstance(spec, dict):
        return {}, flatten({k: v for k, v in spec.items() if k not in ("stage", "output_dir")}), \
            str(path)
    if not isinstance(spec, str):
        raise ConfigError(f"{path}: stages.{command} must be a recipe path or a mapping")
    p = Path(spec).expanduser()
    if not p.is_file() and (here / p).is_file():
        p = here / p
    if not p.is_file():
        from llamatune.shipped import list_recipes

        p = list_recipes().get(spec, p)
    if not p.is_file():
        raise ConfigError(f"{path}:{lines.get('stages', 1)}: stages.{command}: recipe "
                          f"{spec} does not exist (a path, or a name from llamatune ls)")
    file_raw, _ = read_recipe(p)
    if file_raw.get("stage") not in (None, command):
        raise UserError(f"{path}: stages.{command} names {p}, a stage: "
                        f"{file_raw['stage']} recipe.")
    file_raw.pop("stage", None)
    file_raw.pop("output_dir", None)
    return flatten(file_raw), {}, str(p)


def _check_inputs(plans: list[Plan]) -> None:
    """Data and models of every stage, before the first one starts."""
    from llamatune.data import read_records, resolve_data_path
    from llamatune.data.prepare import check
    from llamatune.model import resolve_model_path
    from llamatune.recipes import STAGE_DATA

    for p in plans:
        try:
            check(p.cfg, STAGE_DATA[p.command], f"llamatune {p.command}")
            d = p.cfg.data
            if d.path:
                read_records(resolve_data_path(d.path, p.recipe_path), d.format, d.fields,
                             d.eval_group_by)
            resolve_model_path(p.cfg.model.path)
        except UserError as e:
            raise UserError(f"pipeline stage {p.command}: {e}") from None


def check_pipeline(path: str, overrides: list[str] | None = None) -> int:
    """``llamatune validate`` of a pipeline recipe: every stage's config, data and model.

    Returns:
        The exit code (0).
    """
    plans, merge, out_dir = plan_pipeline(path, overrides)
    _check_inputs(plans)
    for p in plans:
        print(f"  {p.command:4s} -> {p.folder}: model {p.cfg.model.path}"
              f"{' + ' + str(p.cfg.model.adapter) if p.cfg.model.adapter else ''}, data "
              f"{p.cfg.data.path} ({p.cfg.data.format}, template {p.cfg.data.template}), "
              f"{p.cfg.train.max_steps} steps")
    print(f"{path}: ok. pipeline {' -> '.join(p.command for p in plans)}"
          f"{' -> merge' if merge is not False else ''} in {out_dir}")
    return 0


def _comparable(cfg: Config, recipe_path: str | None) -> dict:
    from llamatune.rundir import absolute_config

    flat = flatten(config_to_dict(absolute_config(cfg, recipe_path)))
    return {k: v for k, v in flat.items() if k not in _IGNORED}


def _saved_config(folder: Path) -> dict | None:
    try:
        saved = load_config(folder / "config.yaml")
    except (ConfigError, UserError, OSError):
        return None
    flat = flatten(config_to_dict(saved))
    return {k: v for k, v in flat.items() if k not in _IGNORED}


def _fingerprint(folder: Path) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            h.update(name.encode())
            with open(folder / name, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def _state(out_dir: Path) -> dict:
    try:
        return json.loads((out_dir / "pipeline_state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _inputs(plan: Plan) -> dict:
    """Fingerprints of the runs a stage starts from (its upstream stages' final weights)."""
    sources = {"model.adapter": plan.cfg.model.adapter,
               "ppo.reward_model": plan.cfg.ppo.reward_model}
    return {key: _fingerprint(Path(val)) for key, val in sources.items()
            if val and Path(val).is_dir()}


def _differences(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _decide(plan: Plan, redo: bool, upstream_ran: bool, state: dict) -> str:
    """``skip``, ``resume``, ``fresh`` or ``redo`` for one stage (or raise, naming the keys)."""
    from llamatune.rundir import checkpoints, is_finished

    folder = plan.folder
    if redo or upstream_ran:
        return "redo" if folder.exists() else "fresh"
    finished = is_finished(folder)
    ckpts = checkpoints(folder) if folder.is_dir() else []
    if not finished and not ckpts:
        return "redo" if (folder / "metrics.jsonl").exists() else "fresh"
    saved = _saved_config(folder)
    new = _comparable(plan.cfg, plan.recipe_path)
    changed = _differences(saved, new) if saved is not None else ["config.yaml (unreadable)"]
    recorded = state.get(plan.command, {}).get("inputs")
    if not changed and finished and recorded is not None and recorded != _inputs(plan):
        changed = [f"its inputs ({', '.join(recorded)}) changed since it ran"]
    if changed:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8
                                          else "")
        raise UserError(
            f"pipeline stage {plan.command}: {folder} holds a "
            f"{'finished' if finished else 'started'} run whose config differs from this "
            f"recipe in {shown}. Rerun with --from {plan.command} to redo it and every stage "
            "after it, or restore the recipe.")
    return "skip" if finished else "resume"


def _release_memory() -> None:
    """Give the finished stage's memory back, so the next stage's peak is its own."""
    import ctypes
    import sys

    gc.collect()
    if sys.platform.startswith("linux"):
        try:  # glibc keeps freed heap pages otherwise; the next stage would add to them
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _run_stage(plan: Plan, how: str) -> None:
    cfg = dataclasses.replace(plan.cfg, resume=how == "resume", overwrite=how == "redo")
    if how == "redo":
        for p in plan.folder.glob("checkpoint-*"):
            shutil.rmtree(p, ignore_errors=True)
    module = importlib.import_module(plan.module)
    try:
        module.main(cfg, plan.recipe_path)
    except _stop.Interrupted as e:  # a stop signal: the rerun resumes this stage
        from llamatune.rundir import latest_checkpoint

        e.stage = plan.command
        if e.checkpoint is None and not e.finished:
            e.checkpoint = latest_checkpoint(plan.folder)
        raise


def _headline(folder: Path) -> str:
    from llamatune.report import key_figures

    fig = key_figures(folder)
    parts = []
    for key, v in fig.items():
        if isinstance(v, dict):
            parts.append(f"{key} {v['first']:.3g} -> {v['last']:.3g}")
    if "max_kl" in fig:
        parts.append(f"max KL {fig['max_kl']:.3g}")
    return "; ".join(parts[:2]) or f"{fig['steps']} steps"


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{int(s // 60)}m{int(s % 60):02d}s" if s >= 60 else f"{s:.1f}s"


def run_pipeline(path: str, overrides: list[str] | None = None,
                 from_stage: str | None = None) -> int:
    """Run (or continue) a pipeline; see the module docstring.

    Returns:
        The exit code (0).

    Raises:
        UserError / ConfigError: Bad recipe, data or model, a changed stage without ``--from``.
    """
    if from_stage is not None and from_stage not in STEPS:
        raise UserError(f"--from {from_stage}: not a pipeline step; the steps are "
                        f"{', '.join(STEPS)}.")
    plans, merge, out_dir = plan_pipeline(path, overrides)
    if from_stage not in (None, "merge") and from_stage not in [p.command for p in plans]:
        raise UserError(f"--from {from_stage}: this pipeline has no {from_stage} stage; it runs "
                        f"{', '.join(p.command for p in plans)}.")
    _check_inputs(plans)
    print(f"pipeline {path}: {' -> '.join(p.command for p in plans)}"
          f"{' -> merge' if merge is not False else ''} in {out_dir}", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = _state(out_dir)
    rows, upstream_ran = [], False
    redo_from = STEPS.index(from_stage) if from_stage else len(STEPS)
    with _stop.stage("the step between two stages"):  # a stage names itself (_run_stage)
        for plan in plans:
            redo = STEPS.index(plan.command) >= redo_from
            how = _decide(plan, redo, upstream_ran, state)
            t = time.perf_counter()
            if how == "skip":
                print(f"pipeline: {plan.command} skipped ({plan.folder} is finished, same config)",
                      flush=True)
                wall = state.get(plan.command, {}).get("wall_s")
            else:
                print(f"pipeline: {plan.command} {'resumes' if how == 'resume' else 'runs'} in "
                      f"{plan.folder}", flush=True)
                _run_stage(plan, how)
                wall = time.perf_counter() - t
                state[plan.command] = {"inputs": _inputs(plan), "wall_s": wall}
                _write_json(out_dir / "pipeline_state.json", state)
                upstream_ran = True
                _release_memory()
            rows.append({"stage": plan.command, "status": "skipped" if how == "skip" else
                         ("resumed" if how == "resume" else "ran"), "wall_s": wall,
                         "key_figure": _headline(plan.folder),
                         "folder": str(plan.folder)})
    if merge is not False:
        with _stop.stage("merge"):  # (written under a temporary name: abandoned cleanly)
            rows.append(_merge(plans[-1].folder, out_dir / "merged", merge, state,
                               upstream_ran or redo_from <= STEPS.index("merge")))
        _write_json(out_dir / "pipeline_state.json", state)
    with _stop.stage("the held-out check"):
        held = _held_out(plans, out_dir, state)
    if held is not None:
        rows.append(held)
        _write_json(out_dir / "pipeline_state.json", state)
    summary = {"recipe": str(path), "output_dir": str(out_dir), "stages": rows}
    _write_json(out_dir / "summary.json", summary)
    print(_table(rows), flush=True)
    print(f"summary: {out_dir / 'summary.json'}", flush=True)
    return 0


def _merge(run: Path, merged: Path, opts: dict, state: dict, redo: bool) -> dict:
    from llamatune.merge import run_merge

    record = merged / "llamatune_merge.json"
    done = record.is_file() and json.loads(record.read_text()).get("run_dir") == \
        str(run.resolve()) and state.get("merge", {}).get("source") == _fingerprint(run)
    t = time.perf_counter()
    if done and not redo:
        print(f"pipeline: merge skipped ({merged} is from the same {run.name} run)", flush=True)
        status, wall = "skipped", state["merge"].get("wall_s")
    else:
        if merged.exists():
            shutil.rmtree(merged)
        print(f"pipeline: merge {run} -> {merged}", flush=True)
        run_merge(str(run), str(merged), base=opts.get("base", "auto"), dtype=opts.get("dtype"),
                  samples=int(opts.get("samples", 8)))
        wall = time.perf_counter() - t
        state["merge"] = {"source": _fingerprint(run), "wall_s": wall}
        status = "ran"
    v = json.loads(record.read_text()).get("verification", {})
    figure = (f"verified: max logit diff {v['max_logit_diff']:.2g}" if "max_logit_diff" in v
              else "merged")
    return {"stage": "merge", "status": status, "wall_s": wall, "key_figure": figure,
            "folder": str(merged)}


def _held_out(plans: list[Plan], out_dir: Path, state: dict) -> dict | None:
    """The held-out check: SFT and final answers on topics no stage trained on, scored by the RM.

    The topics are ``data.holdout_topics``; the answers greedy; the prompts the reward
    stage's rows of those topics. Skipped on a rerun whose three runs are unchanged. Writes
    ``held_out.jsonl`` (one row per prompt).
    """
    by = {p.command: p for p in plans}
    if not all(c in by for c in ("sft", "rm", "ppo")):
        return None
    topics = list(by["rm"].cfg.data.holdout_topics)
    if not topics:
        return None
    from llamatune.data.prepare import topic_prompts
    from llamatune.evaluate import compare_runs

    source = {"topics": topics, **{c: _fingerprint(by[c].folder) for c in ("sft", "rm", "ppo")}}
    out = out_dir / "held_out.jsonl"
    t = time.perf_counter()
    done = state.get("held_out", {})
    if done.get("source") == source and out.is_file():
        print("pipeline: held-out check skipped (same runs)", flush=True)
        status = "skipped"
    else:
        prompts = topic_prompts(by["rm"].cfg, topics, by["rm"].recipe_path)
        if not prompts:
            print(f"pipeline: held-out check skipped: the reward data has no rows of "
                  f"{', '.join(topics)}", flush=True)
            return None
        print(f"pipeline: held-out check: {len(prompts)} prompts of {', '.join(topics)}, "
              "answered by sft and ppo, scored by the reward model", flush=True)
        res = compare_runs({"sft": str(by["sft"].folder), "final": str(by["ppo"].folder)},
                           str(by["rm"].folder), [p["messages"] for p in prompts],
                           max_new_tokens=by["ppo"].cfg.ppo.max_new_tokens)
        rows = [{"topic": p["topic"], "prompt": p["messages"][-1]["content"],
                 **{f"{k}_answer": res["answers"][k][i] for k in ("sft", "final")},
                 **{f"{k}_score": round(res["scores"][k][i], 4) for k in ("sft", "final")}}
                for i, p in enumerate(prompts)]
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, out)
        done = state["held_out"] = {
            "source": source, "wall_s": time.perf_counter() - t, "mean": res["mean"],
            "prompts": len(rows), "better": sum(r["final_score"] > r["sft_score"] for r in rows)}
        status = "ran"
        _release_memory()
    mean = done["mean"]
    return {"stage": "held-out", "status": status, "wall_s": done["wall_s"],
            "key_figure": f"RM score sft {mean['sft']:.3g} -> final {mean['final']:.3g} "
                          f"({done['better']}/{done['prompts']} prompts better)",
            "folder": str(out), "mean": mean, "prompts": done["prompts"], "better": done["better"]}


def _table(rows: list[dict]) -> str:
    head = ("stage", "status", "wall", "key figure", "folder")
    body = [(r["stage"], r["status"], _fmt_s(r["wall_s"]), r["key_figure"], r["folder"])
            for r in rows]
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip()
                     for line in [head, *body])
