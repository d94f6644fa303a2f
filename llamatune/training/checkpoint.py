"""Checkpoints and resume: safetensors plus JSON (no pickles), written atomically.

A checkpoint is written under a temporary name and renamed only when complete, so a crash
never leaves one that looks usable but is not; :func:`resume_checkpoint` refuses a resume
whose recipe changed the data order (:func:`data_order`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path

from llamatune import _atomic, dist
from llamatune.config import Config
from llamatune.errors import UserError
from llamatune.rundir import checkpoints, latest_checkpoint

__all__ = ["DATA_KEY", "data_order", "load_checkpoint", "resume_checkpoint", "save_checkpoint"]


def _save_optimizer(sd: dict, folder: Path) -> None:
    from safetensors.torch import save_file

    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for idx, st in sd["state"].items():
        meta["state"][str(idx)] = {}
        for k, v in st.items():
            if hasattr(v, "shape"):
                tensors[f"{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                meta["state"][str(idx)][k] = v
    save_file(tensors, str(folder / "optimizer.safetensors"))
    (folder / "optimizer.json").write_text(json.dumps(meta))


def _load_optimizer(optimizer, folder: Path, groups: list[list]) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "optimizer.safetensors"))
    meta = json.loads((folder / "optimizer.json").read_text())
    state: dict = {int(k): dict(v) for k, v in meta["state"].items()}
    for name, t in tensors.items():
        idx, _, key = name.partition(".")
        state.setdefault(int(idx), {})[key] = t
    dist.load_optimizer_state(optimizer, groups, {"state": state,
                                                  "param_groups": meta["param_groups"]})


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, state: dict,
                    keep: int, save_model, groups: list[list] | None = None) -> Path:
    """Write ``checkpoint-STEP/`` atomically and prune old ones.

    Args:
        run_dir: The run directory.
        step: Optimizer steps done.
        model: The model (its trainable weights are saved by ``save_model``).
        optimizer: Its state is saved as safetensors + JSON.
        scheduler: Its state is saved as JSON.
        state: Loop position and anything else the stage needs to resume (JSON-able).
        keep: Keep this many newest checkpoints.
        save_model: ``callable(model, folder)`` writing the trainable weights.
        groups: The optimizer's parameter groups as built (default: as it holds them now;
            under DeepSpeed the engine has replaced them).

    Under a launcher every process calls it: the weights and optimizer are the same on
    every process (DDP) or made whole from their shards (FSDP2), each process's random
    state is gathered, and the main process writes the folder while the others wait.

    Returns:
        The checkpoint folder.
    """
    import torch

    final = run_dir / f"checkpoint-{step}"
    states = dist.gather({"torch": torch.get_rng_state(), **(
        {"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})})
    groups = groups or [list(g["params"]) for g in optimizer.param_groups]
    moments = dist.optimizer_state(optimizer, groups)
    error = None
    with dist.whole_trainables(getattr(model, "net", model)), dist.on_main() as main:
        if main:
            try:
                _write_checkpoint(run_dir, final, step, model, moments, scheduler, state, keep,
                                  save_model, states)
            except _atomic.WriteError as e:
                error = e
    _atomic.agree(error)  # every process stops when the main one could not write
    return final


def _write_checkpoint(run_dir, final, step, model, moments, scheduler, state, keep,
                      save_model, states) -> None:
    from safetensors.torch import save_file

    tmp = run_dir / f".checkpoint-{step}.tmp"
    for stale in run_dir.glob(".checkpoint-*.tmp"):  # left by a killed run; they take space
        shutil.rmtree(stale, ignore_errors=True)
    done = checkpoints(run_dir)
    fix = ("lower train.keep_checkpoints (fewer kept), or choose another output_dir" +
           (f"; resume=true continues from {done[-1].name}." if done else "."))
    # A failure anywhere here leaves no temporary folder and prunes nothing.
    with _atomic.writing(f"checkpoint-{step}", run_dir, fix, temporary=[tmp]):
        tmp.mkdir(parents=True)
        save_model(model, tmp)
        _save_optimizer(moments, tmp)
        rng = dict(states[0])  # the main process's, under the names a single process uses
        for rank, st in enumerate(states[1:], 1):
            rng.update({f"{k}.{rank}": v for k, v in st.items()})
        save_file(rng, str(tmp / "rng.safetensors"))
        full_state = dict(state, step=step, scheduler=scheduler.state_dict(),
                          python_rng=_py_rng_to_json(random.getstate()), time=time.time())
        # Written last: a checkpoint folder with trainer_state.json is complete.
        (tmp / "trainer_state.json").write_text(json.dumps(full_state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    ckpts = checkpoints(run_dir)
    for old in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, optimizer, scheduler, lr: float | None = None,
                    groups: list[list] | None = None) -> dict:
    """Restore optimizer, scheduler and RNG state; return the saved loop state.

    Args:
        folder: A complete checkpoint.
        optimizer: Built as for a new run.
        scheduler: Built as for a new run (its schedule shape comes from the current recipe).
        lr: The current ``train.lr``. A resumed run uses it, so a run stopped by a NaN can
            continue from its last good checkpoint at a lower rate (torch would restore the
            saved peak rate with the scheduler state).
        groups: As for :func:`save_checkpoint`.
    """
    import torch
    from safetensors.torch import load_file

    _load_optimizer(optimizer, folder,
                    groups or [list(g["params"]) for g in optimizer.param_groups])
    state = json.loads((folder / "trainer_state.json").read_text())
    scheduler.load_state_dict(state["scheduler"])
    if lr is not None and any(base != lr for base in scheduler.base_lrs):
        scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
        for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
            group["lr"] = lr * factor(scheduler.last_epoch)
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    rng = load_file(str(folder / "rng.safetensors"))
    rank = dist.world().rank
    mine = {k: rng.get(f"{k}.{rank}", v) for k, v in rng.items() if "." not in k}
    torch.set_rng_state(mine["torch"])
    if "cuda" in mine and torch.cuda.is_available():
        torch.cuda.set_rng_state(mine["cuda"])
    random.setstate(_py_rng_from_json(state["python_rng"]))
    return state


DATA_KEY = "data"
_DATA_WHAT = "the training data (data.path's rows, data.template, the tokenizer or the split)"


def data_order(cfg: Config, samples: list[dict]) -> dict:
    """What decides which samples each step sees; stored with every checkpoint.

    A resume whose recipe changed any of these would silently continue a different run:
    the saved position counts micro-batches of the old order.
    """
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps(s, sort_keys=True).encode())
        h.update(b"\n")
    t = cfg.train
    return {"train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum,
            "train.seed": t.seed, "train.max_length": t.max_length, "train.packing": t.packing,
            "train.group_by_length": t.group_by_length, DATA_KEY: h.hexdigest()[:24]}


def resume_checkpoint(cfg: Config, run_dir: Path, order: dict) -> Path:
    """The checkpoint to resume from, refused when the recipe changed the data order.

    Args:
        cfg: The config of the run being resumed.
        run_dir: Its run directory.
        order: :func:`data_order` of the run as configured now.

    Returns:
        The newest complete checkpoint.

    Raises:
        UserError: There is none, or it was written under another data order and
            ``resume_accept_changes`` is not set.
    """
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:  # prepare_output_dir checked; a checkpoint vanished meanwhile
        raise UserError(f"resume=true but output_dir {cfg.output_dir} has no complete "
                        "checkpoint-STEP folder; set train.save_every to write checkpoints, or "
                        "drop resume=true.")
    saved = json.loads((ckpt / "trainer_state.json").read_text()).get("data_order", {})
    changed = [k for k in order if k in saved and saved[k] != order[k]]
    if changed and not cfg.resume_accept_changes:
        what = "; ".join(_DATA_WHAT + " changed" if k == DATA_KEY else
                         f"{k} was {saved[k]!r}, now {order[k]!r}" for k in changed)
        raise UserError(
            f"resume=true: {ckpt.name} was written with a different data order ({what}), so "
            "resuming would not continue the same run. Restore those settings, start a new "
            "output_dir, or set resume_accept_changes=true to continue anyway with the new "
            "order.")
    return ckpt

def _py_rng_to_json(st):
    return [st[0], list(st[1]), st[2]]


def _py_rng_from_json(st):
    return (st[0], tuple(st[1]), st[2])


# -- the stage's side of the loop ------------------------------------------------------------
