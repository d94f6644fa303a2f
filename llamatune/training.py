"""The step loop every stage shares, and its pieces: batches, optimizer, checkpoints, resume.

A stage supplies what differs (:class:`Stage`: its batches, the count a micro-batch's loss
is normalized by, a loss returning the *summed* loss plus metric sums, and its evaluation);
:class:`Loop` does the rest the same way for every stage: gradient accumulation normalized
over the whole window (every token, or pair, weighs the same whatever micro-batch it landed
in), clipping, the optimizer and schedule, ``metrics.jsonl`` rows, evaluation on schedule,
atomic checkpoints, exact resume, and the stop before a NaN update. :func:`start` is the
setup every stage opens with: the cheap checks, the data, the resume check, the run
directory. Checkpoints are safetensors plus JSON (no pickles), written under a temporary
name and renamed only when complete, so a crash never leaves a checkpoint that looks usable
but is not.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from llamatune import _atomic, _stop, dist
from llamatune.config import Config, TrainConfig
from llamatune.errors import UserError
from llamatune.rundir import checkpoints, latest_checkpoint

__all__ = [
    "Loop",
    "MetricsWriter",
    "Progress",
    "Stage",
    "StageRun",
    "Start",
    "TrainingDiverged",
    "batch_groups",
    "build_optimizer",
    "build_scheduler",
    "check_finite",
    "data_order",
    "draw_plots",
    "epoch_batches",
    "load_checkpoint",
    "n_pairs",
    "pair_batches",
    "pair_row",
    "resume_checkpoint",
    "run_stage",
    "save_checkpoint",
    "set_seed",
    "start",
    "trainable_state_dict",
]

def set_seed(seed: int) -> None:
    """Seed Python, NumPy (if present) and torch."""
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def build_optimizer(model, tcfg: TrainConfig, allocate: bool = True):
    """AdamW over trainable parameters; no weight decay on biases and norms.

    Trainable parameters are given float32 storage first (the dtype policy of
    :mod:`llamatune.model`), so master weights and AdamW moments are float32 whatever the
    frozen base computes in. ``allocate`` creates gradients and moments up front
    (:func:`_allocate_state`); not for DeepSpeed, whose engine keeps its own.
    """
    import torch

    from llamatune.model import fp32_trainable

    fp32_trainable(model)

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise RuntimeError("no trainable parameters")
    optimizer = torch.optim.AdamW(groups, lr=tcfg.lr, betas=(0.9, 0.999), eps=1e-8)
    if allocate:
        _allocate_state(optimizer)
    return optimizer


def _allocate_state(optimizer) -> None:
    """Create the gradients and AdamW moments now, before the first step, and keep them.

    torch creates them lazily: gradients during the first backward pass and the moments in the
    first optimizer step, right after the first batch's activations were freed. They then sit
    scattered through that freed region for the rest of the run, and on CPU (glibc malloc
    hands freed memory back to the system only from the top of the heap) every later step has
    to grow the heap around them: measured on the default model, 1.2 GB more peak resident
    memory than the live tensors need. Made here, they sit below everything a step allocates.
    The values are what torch would create (zeros, step 0), so training is unchanged; the
    loop zeroes gradients in place (``zero_grad(set_to_none=False)``) to keep them.
    """
    import torch

    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            state = optimizer.state[p]
            if not state and not group.get("fused") and not group.get("capturable"):
                # As torch.optim.AdamW._init_group makes it (not fused, not capturable).
                scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
                state["step"] = torch.tensor(0.0, dtype=scalar)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def build_scheduler(optimizer, tcfg: TrainConfig, total_steps: int):
    """Linear warmup, then cosine or linear decay to zero (or constant)."""
    import torch

    warmup = int(tcfg.warmup_ratio * total_steps) if tcfg.warmup_ratio else tcfg.warmup_steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if tcfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if tcfg.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Part(list):
    """One process's sample indices of a global micro-batch (a list).

    ``dummy``: this process's share of a short last micro-batch was empty, so the part holds
    one sample of the batch only to keep the processes' forward and backward passes in step;
    the loop gives it no weight.
    """

    dummy = False


def _global_batch(tcfg: TrainConfig, shard: bool) -> int:
    """Samples a micro-batch spans: over every process when training batches are sharded."""
    return tcfg.batch_size * (dist.world().size if shard else 1)


def _parts(groups: list[list[int]], shard: bool) -> list[Part]:
    out = []
    for g in groups:
        part = Part(dist.shard(g) if shard else g)
        if not part:
            part, part.dummy = Part(g[:1]), True
        out.append(part)
    return out


def batch_groups(lengths: list[int], tcfg: TrainConfig, epoch: int,
                 shuffle: bool = True, shard: bool | None = None,
                 drop_last: bool = False) -> list[Part]:
    """Sample indices of one epoch's micro-batches, in a seeded order that depends only on the epoch.

    With ``group_by_length``, samples are sorted by length within chunks of 64 batches, so
    each batch holds similar lengths (little padding), and the batches are then shuffled so
    the order still looks random to the optimizer.

    Under a launcher the groups are *global* micro-batches of ``batch_size`` x processes
    samples, formed exactly as one process would form them at that batch size, and each
    process keeps its slice (:func:`llamatune.dist.shard`): N processes see the same global
    batches as one. ``shard`` (default: ``shuffle``, i.e. training batches) turns that off
    for evaluation, which every process runs whole. ``drop_last`` drops a short last (global)
    micro-batch instead of splitting it.
    """
    shard = shuffle if shard is None else shard
    order = list(range(len(lengths)))
    rng = random.Random(tcfg.seed * 1_000_003 + epoch)
    if shuffle:
        rng.shuffle(order)
    bs = _global_batch(tcfg, shard)
    groups = [order[i : i + bs] for i in range(0, len(order), bs)]
    if shuffle and tcfg.group_by_length:
        chunk = 64 * bs
        groups = []
        for c in range(0, len(order), chunk):
            part = sorted(order[c : c + chunk], key=lambda i: lengths[i])
            groups += [part[i : i + bs] for i in range(0, len(part), bs)]
        rng.shuffle(groups)
    if drop_last:
        groups = [g for g in groups if len(g) == bs]
    return _parts(groups, shard)


def _mark(batch: dict, part: Part) -> dict:
    """Flag a dummy part's batch (see :class:`Part`) with a tensor, as stages move every value."""
    if part.dummy:
        import torch

        batch["dummy"] = torch.tensor(True)
    return batch


def epoch_batches(
    samples: list[dict], tcfg: TrainConfig, epoch: int, pad_id: int, shuffle: bool = True
) -> list[dict]:
    """The micro-batches of one epoch of conversation samples (see :func:`batch_groups`).

    Without packing, each micro-batch holds ``batch_size`` samples padded to the longest.
    With packing, samples are packed into ``max_length`` rows, ``batch_size`` rows a batch.
    """
    from llamatune.data.collate import pack, packed_batch, pad_batch

    if tcfg.packing:
        order = list(range(len(samples)))
        rng = random.Random(tcfg.seed * 1_000_003 + epoch)
        if shuffle:
            rng.shuffle(order)
        bs = _global_batch(tcfg, shuffle)
        rows = pack([samples[i] for i in order], tcfg.max_length)
        parts = _parts([list(range(i, min(i + bs, len(rows)))) for i in range(0, len(rows), bs)],
                       shuffle)
        return [_mark(packed_batch([rows[i] for i in g], pad_id), g) for g in parts]
    lengths = [len(s["input_ids"]) for s in samples]
    return [_mark(pad_batch([samples[i] for i in g], pad_id), g)
            for g in batch_groups(lengths, tcfg, epoch, shuffle)]


def _shared_prefix(sample) -> int:
    """Tokens both sides of a pair share before either answer starts (the prompt)."""
    c, r = sample["chosen_ids"], sample["rejected_ids"]
    limit = min(len(c), len(r)) - 1
    for side in ("chosen", "rejected"):
        labels = sample.get(f"{side}_labels")
        if labels is not None:
            limit = min(limit, next((i for i, t in enumerate(labels) if t != -100), limit))
    n = 0
    while n < limit and c[n] == r[n]:
        n += 1
    return n


def pair_row(sample) -> dict:
    """One preference pair as one row: shared prompt, chosen answer, then rejected answer.

    The prompt is computed once for both answers: the rejected tokens take the positions they
    would have after the prompt alone and attend to the prompt and to each other, never to the
    chosen answer (the mask built by :func:`pair_batches`), so each side's hidden states are
    those of its own ``prompt + answer`` sequence.

    Returns:
        ``input_ids`` and ``position_ids`` (lists), ``split`` (where the rejected part starts),
        ``prefix`` (the shared tokens), the two ``ends`` (each answer's last token), and the
        predicted tokens: ``pred`` as ``(position, label, side)`` triples (side 0 chosen, 1
        rejected), each label predicted from the hidden state at that position.
    """
    c, r = sample["chosen_ids"], sample["rejected_ids"]
    n = _shared_prefix(sample)
    ids = list(c) + list(r[n:])
    pos = list(range(len(c))) + list(range(n, len(r)))
    pred = []
    for side, labels in ((0, sample.get("chosen_labels")), (1, sample.get("rejected_labels"))):
        if labels is None:
            continue
        for j in range(1, len(labels)):
            if labels[j] == -100:
                continue
            if side == 0:
                at = j - 1
            else:  # rejected token j sits at len(c) + j - n; its predictor is the token before
                at = len(c) + j - n - 1 if j > n else n - 1
            pred.append((at, labels[j], side))
    return {"input_ids": ids, "position_ids": pos, "split": len(c), "prefix": n,
            "ends": (len(c) - 1, len(ids) - 1), "pred": pred}


def pair_batches(samples: list[dict], tcfg: TrainConfig, epoch: int, pad_id: int,
                 shuffle: bool = True) -> list[dict]:
    """The micro-batches of one epoch of preference pairs, one row per pair (:func:`pair_row`).

    Ordered like :func:`epoch_batches` (by the pair row's length), so a resumed run sees the
    same batches. Each batch holds ``input_ids``, ``position_ids``, a boolean
    ``attention_mask`` ``[n, 1, T, T]`` (causal, the rejected answer blind to the chosen one,
    padding masked), ``ends`` ``[n, 2]`` (the last token of each answer, where a reward is
    read), ``pred_pos`` / ``pred_label`` / ``pred_side`` ``[n, L]`` (``-100`` labels pad),
    ``n_real`` and, where the samples carry them, ``ref_logp`` ``[2n]`` (reference log-probs,
    chosen first). Figures computed per side come back as ``[2n]``, chosen rows first.
    """
    import torch

    rows = [pair_row(s) for s in samples]
    lengths = [len(r["input_ids"]) for r in rows]
    out = []
    for g in batch_groups(lengths, tcfg, epoch, shuffle):
        part = [rows[i] for i in g]
        n, t = len(part), max(lengths[i] for i in g)
        width = max(1, max(len(r["pred"]) for r in part))
        ids = torch.full((n, t), pad_id, dtype=torch.long)
        pos = torch.zeros((n, t), dtype=torch.long)
        mask = torch.zeros((n, 1, t, t), dtype=torch.bool)
        ends = torch.zeros((n, 2), dtype=torch.long)
        pred_pos = torch.zeros((n, width), dtype=torch.long)
        pred_label = torch.full((n, width), -100, dtype=torch.long)
        pred_side = torch.zeros((n, width), dtype=torch.long)
        causal = torch.tril(torch.ones((t, t), dtype=torch.bool))
        for k, row in enumerate(part):
            m = len(row["input_ids"])
            ids[k, :m] = torch.tensor(row["input_ids"])
            pos[k, :m] = torch.tensor(row["position_ids"])
            mask[k, 0, :m, :m] = causal[:m, :m]
            mask[k, 0, row["split"]:m, row["prefix"]:row["split"]] = False
            mask[k, 0, m:, :].fill_(False)
            mask[k, 0, range(m, t), range(m, t)] = True  # padding attends to itself (no NaN)
            ends[k] = torch.tensor(row["ends"])
            if row["pred"]:
                p = torch.tensor(row["pred"])
                pred_pos[k, : len(p)], pred_label[k, : len(p)], pred_side[k, : len(p)] = p.T
        batch = {"input_ids": ids, "position_ids": pos, "attention_mask": mask, "ends": ends,
                 "pred_pos": pred_pos, "pred_label": pred_label, "pred_side": pred_side,
                 "n_real": torch.tensor(sum(lengths[i] for i in g))}
        if "ref_logp" in samples[g[0]]:  # precomputed reference log-probs (DPO)
            batch["ref_logp"] = torch.tensor([samples[i]["ref_logp"][k] for k in (0, 1)
                                              for i in g], dtype=torch.float64)
        out.append(_mark(batch, g))
    return out


def n_pairs(batch: dict) -> int:
    """Preference pairs in a :func:`pair_batches` micro-batch (one row each)."""
    return batch["input_ids"].shape[0]


def trainable_state_dict(model) -> dict:
    """The trainable tensors (adapter and any fully trained modules)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl``.

    With a ``monitor`` (:class:`~llamatune.health.Monitor`), every process feeds it every
    row, and the main process appends and prints the alarms that trip after the row.
    """

    def __init__(self, path: Path, resume_step: int | None = None, trackers=None,
                 monitor=None):
        self.path = path
        self.trackers = trackers
        """:class:`~llamatune.trackers.Trackers` that also get every row (``train.report_to``)."""
        self.monitor = monitor
        self.enabled = dist.world().main  # under a launcher, the main process writes
        if self.enabled and resume_step is not None and path.exists():
            # Drop rows logged after the checkpoint we resume from: they will be redone. A
            # process killed mid-write leaves a torn last line; it goes too.
            keep = []
            for ln in path.read_text().splitlines():
                try:
                    row = json.loads(ln)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and row.get("step", 0) <= resume_step:
                    keep.append(ln)
            with _atomic.writing(path.name, path.parent, self._fix):
                _atomic.write_text(path, "".join(k + "\n" for k in keep))
        if monitor is not None and resume_step is not None:
            monitor.resume(path, resume_step)  # every process: the alarms agree

    _fix = "choose another output_dir; earlier rows are whole, resume=true continues."

    def write(self, row: dict) -> None:
        """Append a row (and the alarms it trips) and flush.

        Raises:
            WriteError: The row could not be appended; the file keeps its earlier rows whole.
                Only the main process writes, so the run stops there; under a launcher the
                other processes stop at their next collective when it exits (the launcher
                ends them), they do not wait forever.
        """
        alarms = self.monitor.observe(row) if self.monitor is not None else []
        if not self.enabled:
            return
        self._append([row, *alarms], alarms)
        if self.trackers is not None:
            self.trackers.log(row)

    def _append(self, rows: list[dict], alarms: list[dict]) -> None:
        """One append of ``rows`` (a figure row and the alarms it tripped), then the alarms said."""
        from llamatune.health import announce

        if not rows or not self.enabled:
            return
        with _atomic.writing(f"a row of {self.path.name}", self.path.parent, self._fix):
            _atomic.append_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        for a in alarms:
            announce(a)

    def close(self) -> None:
        """Check the end-of-run alarms and finish the trackers (the file needs nothing)."""
        if self.monitor is not None:
            alarms = self.monitor.finish()
            self._append(alarms, alarms)
            self.monitor = None
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None


class Progress:
    """A tqdm bar with step, loss, tokens/s and ETA; plain lines every 10 steps when disabled."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str, every: int = 10):
        self.bar = None
        self.total, self.step, self.every, self.desc = total, initial, every, desc
        self.start, self.start_step = time.perf_counter(), initial
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

    def update(self, **fields) -> None:
        """Advance one step and show the latest figures."""
        self.step += 1
        if self.bar is not None:
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                                  for k, v in fields.items()}, refresh=False)
            self.bar.update(1)
        elif self.step % self.every == 0 or self.step == self.total:
            done = self.step - self.start_step
            eta = (time.perf_counter() - self.start) / max(done, 1) * (self.total - self.step)
            figures = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in fields.items())
            print(f"{self.desc} step {self.step}/{self.total} {figures} eta {eta:.0f}s", flush=True)

    def write(self, msg: str) -> None:
        """Print a line without breaking the bar."""
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        """Close the bar."""
        if self.bar is not None:
            self.bar.close()


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


class TrainingDiverged(UserError):
    """The loss or gradient norm became NaN or infinite; the bad update was not applied."""


def check_finite(step: int, loss: float, grad_norm: float | None, run_dir: Path,
                 applied: bool = False) -> None:
    """Stop before ``optimizer.step()`` when the step's loss or gradient norm is not finite.

    Args:
        step: The step about to be applied (1-based).
        loss: Its loss.
        grad_norm: Its gradient norm before clipping (``None`` when not computed).
        run_dir: Where the last good checkpoint is.
        applied: The update was already applied (DeepSpeed's engine steps and measures at
            once); the message says so.

    Raises:
        TrainingDiverged: Naming the step and the checkpoint to continue from.
    """
    if math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)):
        return
    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
    ckpt = latest_checkpoint(run_dir)
    then = (f"The last good checkpoint, {ckpt}, is kept: continue from it with resume=true and "
            "a lower train.lr (or more train.warmup_steps)." if ckpt is not None else
            "No checkpoint was written before it (train.save_every writes them); rerun with a "
            "lower train.lr (or more train.warmup_steps) and overwrite=true.")
    when = "just after applying" if applied else "before applying"
    raise TrainingDiverged(f"training diverged at step {step}: {what}. The run stopped {when} "
                           f"that update and wrote no final adapter. {then}")


def _py_rng_to_json(st):
    return [st[0], list(st[1]), st[2]]


def _py_rng_from_json(st):
    return (st[0], tuple(st[1]), st[2])


# -- the stage's side of the loop ------------------------------------------------------------

@dataclass
class Start:
    """What :func:`start` hands a stage: the run directory, tokenizer and data, resume point."""

    run_dir: Path
    tokenizer: object
    data: object
    """The :class:`~llamatune.data.prepare.Prepared` data."""
    data_order: dict
    resume_from: Path | None
    """The checkpoint to resume from (``resume=true``), already checked against the data order."""


def _check_scheme(cfg: Config) -> None:
    """Refuse what the launcher's scheme cannot run, before anything loads.

    Under ZeRO-3 ``model.fused`` is turned off (said on the console): its kernels keep LoRA
    and head weights for their backward pass, which ZeRO-3 has partitioned again by then.

    Raises:
        UserError: A quantized base under a scheme that shards parameters and does not take
            it (ZeRO-3 with 4-bit is unsupported upstream; 8-bit is not sharded by FSDP2 or
            ZeRO-3).
    """
    scheme, q = dist.world().scheme, cfg.model.quantization
    if scheme == "zero3" and q != "none":
        raise UserError(f"model.quantization: a {q} base cannot run under DeepSpeed ZeRO-3 "
                        "(ZeRO-3 does not shard bitsandbytes' quantized weights upstream); use "
                        "the fsdp2 config (QLoRA shards there), zero2 or ddp.")
    if scheme == "fsdp2" and q == "8bit":
        raise UserError("model.quantization: an 8bit base is not sharded by FSDP2 here; use 4bit "
                        "with fsdp2, or the ddp config.")
    if scheme == "zero3" and cfg.model.fused:
        cfg.model.fused = False
        print("model.fused: off under DeepSpeed ZeRO-3 (its kernels read weights ZeRO-3 "
              "gathers only inside each layer's own forward and backward)", flush=True)


def start(cfg: Config, kind: str, command: str, recipe_path: str | None = None) -> Start:
    """Open a stage: check cheap things first, tokenize, check the resume, create the run dir.

    Nothing is written until the data and the resume point are known good; the model is not
    loaded (nor a GGUF converted) before a bad recipe key or data row has been reported.

    Args:
        cfg: The stage's config (its paths are written back absolute).
        kind: The data kind (``conversations``, ``pairs``, ``prompts``).
        command: The stage command, for messages (``llamatune rm``).
        recipe_path: The recipe file.

    Returns:
        A :class:`Start`.
    """
    from llamatune import rundir
    from llamatune.data import prepare
    from llamatune.data.prepare import check
    from llamatune.model import load_tokenizer, resolve_model_path

    run_dir = rundir.prepare_output_dir(cfg)
    check(cfg, kind, command)
    _check_scheme(cfg)
    if cfg.train.trackers:
        from llamatune.trackers import check_installed

        check_installed(cfg.train.trackers)
    with dist.on_main() as main:  # a built-in model is converted once, by one process
        if main:
            resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(cfg.model, resolve_model_path(cfg.model.path))
    data = prepare(cfg, tokenizer, kind, command, recipe_path)
    print(f"data: {data.summary()}", flush=True)
    order = data_order(cfg, data.train)
    ckpt = resume_checkpoint(cfg, run_dir, order) if cfg.resume else None
    dist.barrier()  # every process has checked output_dir before one writes to it
    with dist.on_main() as main:
        if main:
            rundir.create_output_dir(cfg, run_dir)
            rundir.write_run_files(run_dir, rundir.absolute_config(cfg, recipe_path), tokenizer)
    set_seed(cfg.train.seed)
    return Start(run_dir, tokenizer, data, order, ckpt)


class StageRun:
    """The end of a stage every stage shares: run the loop, checkpoint, write the final files.

    A stage class sets ``self.loop`` (a :class:`Loop`), ``self.loaded`` and ``self.run_dir`` in
    its ``setup`` and names what it saves in :attr:`saved`.
    """

    saved = "adapter"
    """What the final files hold, for the last message (``"the PPO policy adapter"``)."""

    def train(self) -> None:
        """Run the optimizer steps (the shared loop)."""
        self.loop.run()

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-STEP/`` (trainable weights, optimizer, schedule, RNG, position)."""
        return self.loop.save_checkpoint()

    def cleanup(self) -> None:
        """Write the trainable adapter and heads beside the config, tokenizer and template."""
        from llamatune.model import save_trainable
        from llamatune.rundir import write_final

        with dist.whole_trainables(self.loaded.net):  # sharded: every process gathers
            write_final(self.run_dir, lambda folder: save_trainable(self.loaded, folder))
        print(f"saved {self.saved}, tokenizer and config to {self.run_dir}", flush=True)


class Stage(Protocol):
    """What a stage gives :class:`Loop`."""

    name: str
    """Short name for the progress bar (``sft``, ``rm``, ``dpo``)."""

    def batches(self, epoch: int) -> list[dict]:
        """The micro-batches of an epoch, in a seeded order (each with ``n_real``)."""

    def count(self, batch: dict) -> int:
        """The units (supervised tokens, pairs) a micro-batch's loss sums over."""

    def loss(self, batch: dict):
        """``(loss_sum, metric_sums)``: the summed loss (a tensor) and per-unit figures summed."""

    def evaluate(self) -> dict:
        """Held-out figures (``eval_loss`` and the stage's own), or ``{}``."""


class Loop:
    """The optimizer steps of a stage, the same for every stage.

    Args:
        cfg: The stage's config (``train.*``).
        stage: The :class:`Stage`.
        loaded: The :class:`~llamatune.model.Loaded` model (its net's trainable parameters
            are optimized; its trainable adapter and heads are what checkpoints save).
        begun: The stage's :class:`Start` (run directory, data order, resume point).
        has_eval: Whether the stage has held-out data to evaluate.
    """

    def __init__(self, cfg: Config, stage: Stage, loaded, begun: Start, has_eval: bool):
        self.cfg, self.stage, self.loaded = cfg, stage, loaded
        self.run_dir, self.data_order = begun.run_dir, begun.data_order
        self.has_eval = has_eval
        self.step = self.epoch = self.micro = 0  # micro: micro-batches of this epoch consumed
        self._batches, self._batches_epoch, self._params = None, -1, []
        tc = cfg.train
        n_micro = len(stage.batches(0))
        per_step = 1 if hasattr(stage, "iteration") else tc.grad_accum  # an iteration: one batch
        self.steps_per_epoch = max(1, math.ceil(n_micro / per_step))
        self.total_steps = tc.step_cap or math.ceil(tc.epochs * self.steps_per_epoch)
        from llamatune.model import fp32_trainable, load_trainable

        fp32_trainable(loaded.net)
        if begun.resume_from is not None:  # into float32 masters, before DDP copies them
            load_trainable(loaded, begun.resume_from)
        # Under a launcher: the net wrapped (DDP, FSDP2) before the optimizer sees its weights;
        # DeepSpeed's engine takes net and optimizer together.
        deepspeed = dist.world().zero is not None
        if not deepspeed:
            self.wrapped = dist.prepare(loaded.net)
        self.optimizer = build_optimizer(loaded.net, tc, allocate=not deepspeed)
        self.groups = [list(g["params"]) for g in self.optimizer.param_groups]  # as built
        if deepspeed:
            self.wrapped = dist.prepare(loaded.net, self.optimizer, batch_size=tc.batch_size,
                                        max_grad_norm=tc.max_grad_norm)
        self.scheduler = build_scheduler(self.optimizer, tc, self.total_steps)
        w = dist.world()
        if w.accelerator is not None:  # launched (several processes, or one that shards)
            per = (f"{cfg.ppo.rollout_batch} prompts" if hasattr(stage, "iteration") else
                   f"{tc.batch_size} x {tc.grad_accum} accumulation")
            n = f"{w.size} process{'es' if w.size > 1 else ''}"
            print(f"{n} ({w.scheme}): global batch {per} x {n}", flush=True)
        resume_step = None
        if begun.resume_from is not None:
            state = load_checkpoint(begun.resume_from, self.optimizer, self.scheduler, tc.lr,
                                    self.groups)
            self.step, self.epoch, self.micro = state["step"], state["epoch"], state["micro"]
            if hasattr(stage, "load_state") and "stage" in state:
                stage.load_state(state["stage"])
            resume_step = self.step
            print(f"resumed from {begun.resume_from} (step {self.step})", flush=True)
        trackers = None
        if tc.trackers and w.main:
            from llamatune.config import config_to_dict
            from llamatune.trackers import Trackers

            trackers = Trackers(tc.trackers, self.run_dir, config_to_dict(cfg))
        from llamatune.health import Monitor

        monitor = Monitor(stage.name, getattr(stage, "alarm_context", None)) if tc.alarms else None
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl", resume_step, trackers,
                                     monitor)

    def next_batch(self) -> dict:
        """The next micro-batch of the stage's epochs (the position checkpoints save)."""
        if self._batches is None or self._batches_epoch != self.epoch:
            self._batches, self._batches_epoch = self.stage.batches(self.epoch), self.epoch
        if self.micro >= len(self._batches):
            self.epoch += 1
            self.micro = 0
            self._batches, self._batches_epoch = self.stage.batches(self.epoch), self.epoch
        self.micro += 1
        return self._batches[self.micro - 1]

    @property
    def epoch_progress(self) -> float:
        """Epochs done, fractional."""
        n = len(self._batches) if self._batches else 1
        return self.epoch + self.micro / max(n, 1)

    def apply(self, loss: float) -> float | None:
        """Clip the accumulated gradients, stop on a NaN, step the optimizer, clear gradients.

        Args:
            loss: The loss the gradients came from (checked finite with the gradient norm).

        Returns:
            The gradient norm before clipping (``None`` when ``train.max_grad_norm`` is 0).

        Raises:
            TrainingDiverged: Before the update, when the loss or norm is not finite. Under
                DeepSpeed the engine computes the norm while it steps, so a non-finite norm
                stops the run just after that update (the last checkpoint precedes it).
        """
        import torch

        tc = self.cfg.train
        grad_norm = None
        if dist.world().zero is not None:
            check_finite(self.step + 1, loss, None, self.run_dir)
            grad_norm = dist.step(self.wrapped, self._params)
            grad_norm = grad_norm if tc.max_grad_norm > 0 else None
            check_finite(self.step + 1, loss, grad_norm, self.run_dir, applied=True)
            return grad_norm
        if tc.max_grad_norm > 0:  # under DDP every process holds the same reduced gradients
            norm = torch.nn.utils.clip_grad_norm_(self._params, tc.max_grad_norm)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        check_finite(self.step + 1, loss, grad_norm, self.run_dir)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)
        return grad_norm

    def _window_step(self) -> tuple[float, dict, int, float | None]:
        """One optimizer step over ``train.grad_accum`` micro-batches (the default step).

        Normalized over the whole window, and under a launcher over every process's window
        (the count is summed across processes first, and the wrapper's gradient average is
        undone), so every unit weighs the same wherever it landed: N processes at the same
        global batch take the step one process would.
        """
        stage, size = self.stage, dist.world().size
        window = [self.next_batch() for _ in range(self.cfg.train.grad_accum)]
        real = [not bool(b.get("dummy", False)) for b in window]
        count = dist.all_sum([sum(stage.count(b) for b, r in zip(window, real) if r)])[0]
        step_loss, sums, tokens = 0.0, {}, 0
        for i, (b, r) in enumerate(zip(window, real)):
            # Gradients are synchronized on the window's last backward only.
            with dist.no_sync(self.wrapped, enabled=i < len(window) - 1):
                loss_sum, figures = stage.loss(b)
                if not r:  # a dummy part: in step with the other processes, no weight
                    loss_sum, figures = loss_sum * 0, {k: 0.0 for k in figures}
                dist.backward(self.wrapped, loss_sum * (size / count),
                              boundary=i == len(window) - 1)
            step_loss += loss_sum.item()
            for k, v in figures.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            tokens += int(b["n_real"]) if r else 0
        keys = sorted(sums)
        total = dist.all_sum([step_loss, tokens, *(sums[k] for k in keys)])
        grad_norm = self.apply(total[0] / count)
        return (total[0] / count, {k: v / count for k, v in zip(keys, total[2:])},
                int(total[1]), grad_norm)

    def run(self) -> None:
        """Run the steps, logging, evaluating and checkpointing on schedule.

        A step is one optimizer step over ``train.grad_accum`` micro-batches, or, for a stage
        with an ``iteration(loop)`` method (PPO: a rollout and its updates), one iteration:
        ``(loss, figures, tokens, grad_norm)`` as the default step returns them.
        """
        tc, stage, net = self.cfg.train, self.stage, self.loaded.net
        net.train()
        bar = Progress(self.total_steps, self.step, tc.progress and dist.world().main, stage.name)
        self._params = [p for g in self.groups for p in g]
        step = getattr(stage, "iteration", None)
        t_log, tokens_log = time.perf_counter(), 0
        while self.step < self.total_steps:
            _stop_point(self, bar)
            lr = self.scheduler.get_last_lr()[0]
            loss, figures, tokens, grad_norm = step(self) if step else self._window_step()
            self.scheduler.step()
            self.step += 1
            tokens_log += tokens
            if self.step % tc.log_every == 0 or self.step == self.total_steps:
                dt = time.perf_counter() - t_log
                row = {"step": self.step, "epoch": round(self.epoch_progress, 4),
                       "loss": round(loss, 6), "lr": lr, "tokens_per_s": round(tokens_log / dt, 2)}
                row.update({k: round(v, 6) if isinstance(v, float) else v
                            for k, v in figures.items()})
                if grad_norm is not None:
                    row["grad_norm"] = round(grad_norm, 6)
                self.metrics.write(row)
                shown = {k: v for k, v in figures.items() if k in ("accuracy", "reward_mean")}
                bar.update(loss=loss, **shown, tok_s=round(tokens_log / dt))
                t_log, tokens_log = time.perf_counter(), 0
            else:
                bar.update(loss=loss)
            if self.has_eval and tc.eval_every and self.step % tc.eval_every == 0:
                self._log_eval(bar)
            if tc.save_every and self.step % tc.save_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        _stop_point(self, bar)
        bar.close()
        # The last step's scheduled evaluation already measured the final model.
        if self.has_eval and not (tc.eval_every and self.step % tc.eval_every == 0):
            self._log_eval(None)
        self.metrics.close()

    def evaluate(self) -> dict:
        """The stage's held-out figures, in eval mode and without gradients."""
        import torch

        net = self.loaded.net
        net.eval()
        try:
            with torch.no_grad():
                return self.stage.evaluate()
        finally:
            net.train()

    def _log_eval(self, bar) -> None:
        ev = self.evaluate()
        if not ev:
            return
        self.metrics.write({"step": self.step, **{k: round(v, 6) for k, v in ev.items()}})
        msg = f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items())
        if bar is not None:
            bar.write(msg)
        else:
            print(msg, flush=True)

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-STEP/``: trainable weights, optimizer, schedule, RNG, position."""
        from llamatune.model import save_trainable

        return save_checkpoint(
            self.run_dir, self.step, self.loaded, self.optimizer, self.scheduler,
            {"epoch": self.epoch, "micro": self.micro, "data_order": self.data_order,
             **({"stage": self.stage.state()} if hasattr(self.stage, "state") else {})},
            self.cfg.train.keep_checkpoints, save_trainable, self.groups)


def _stop_point(loop: Loop, bar) -> None:
    """After a stop signal, checkpoint the steps done and raise ``Interrupted``.

    Every process agrees first (:func:`llamatune._stop.agreed`), so all stop at this step;
    the main process's run directory says whether its checkpoint is already written.
    """
    signum = _stop.agreed()
    if signum is None:
        return
    bar.close()
    loop.metrics.close()
    ckpt = loop.run_dir / f"checkpoint-{loop.step}"
    if loop.step and not dist.all_sum([dist.world().main and ckpt in checkpoints(loop.run_dir)])[0]:
        ckpt = loop.save_checkpoint()
    raise _stop.Interrupted(signum, loop.step, loop.total_steps, ckpt if loop.step else None)


def run_stage(recipe) -> int:
    """Run a stage start to end (setup, the loop, the final files), then draw its plots.

    Returns:
        The process exit code (0).

    Raises:
        llamatune._stop.Interrupted: A stop signal (the loop's checkpoint, or the final
            files completed first).
    """
    recipe.setup()
    with _stop.deferred():  # a signal now stops at a step boundary, or after the final files
        recipe.train()
        recipe.cleanup()
    if (signum := _stop.agreed()) is not None:
        raise _stop.Interrupted(signum, finished=True)
    if dist.world().main:
        draw_plots(recipe.run_dir)
    return 0


def draw_plots(run_dir) -> None:
    """Draw the run's PNG plots (:mod:`llamatune.plots`); a failure only warns: the run is done."""
    import sys

    try:
        from llamatune.plots import plot_run

        written = plot_run(run_dir)
    except ImportError as e:
        print(f"note: no plots ({e}); pip install matplotlib, then `llamatune report "
              f"{run_dir}`", file=sys.stderr, flush=True)
        return
    except Exception as e:  # noqa: BLE001 - a figure must not fail a finished run
        print(f"warning: plotting {run_dir} failed ({type(e).__name__}: {e}); the run itself is "
              "complete", file=sys.stderr, flush=True)
        return
    if written:
        print(f"plots: {', '.join(p.name for p in written)} in {written[0].parent}", flush=True)
