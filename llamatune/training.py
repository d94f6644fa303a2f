"""Loop pieces every stage shares: seeding, optimizer, schedule, batches, loss, checkpoints.

Plain functions, no trainer base class: a stage composes what it needs and reads top to
bottom. Checkpoints are safetensors plus JSON (no pickles), written under a temporary
name and renamed only when complete, so a crash never leaves a checkpoint that looks
usable but is not.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

from llamatune.config import Config, TrainConfig, save_config
from llamatune.errors import UserError

__all__ = [
    "MetricsWriter",
    "Progress",
    "TrainingDiverged",
    "build_optimizer",
    "build_scheduler",
    "check_finite",
    "create_output_dir",
    "data_order",
    "epoch_batches",
    "latest_checkpoint",
    "lm_loss_sum",
    "load_checkpoint",
    "prepare_output_dir",
    "resume_checkpoint",
    "save_checkpoint",
    "set_seed",
    "trainable_state_dict",
]

_FINISHED_MARKERS = ("adapter_model.safetensors", "model.safetensors")


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


def prepare_output_dir(cfg: Config) -> Path:
    """Check ``output_dir`` can be written and holds no run we would silently clobber.

    Creates nothing; call :func:`create_output_dir` once the inputs are validated.

    Raises:
        UserError: Not writable, or a finished run / checkpoints exist and neither
            ``resume`` nor ``overwrite`` is set.
    """
    out = Path(cfg.output_dir).expanduser()
    # Check without creating anything: nothing is written until the inputs are known good.
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        why = "is not a folder" if probe.exists() and not probe.is_dir() else "is not writable"
        raise UserError(
            f"output_dir {cfg.output_dir} cannot be created: {probe} {why}; choose another "
            "folder with output_dir=PATH."
        )
    has_ckpt = bool(_checkpoints(out)) if out.is_dir() else False
    finished = any((out / m).exists() for m in _FINISHED_MARKERS)
    if cfg.resume:
        if not has_ckpt:
            raise UserError(
                f"resume=true but output_dir {cfg.output_dir} has no complete checkpoint-STEP "
                "folder; set train.save_every to write checkpoints, or drop resume=true."
            )
    elif (has_ckpt or finished) and not cfg.overwrite:
        raise UserError(
            f"output_dir {cfg.output_dir} already holds a run. Continue it with resume=true, "
            "replace it with overwrite=true, or pick another output_dir."
        )
    return out


def create_output_dir(cfg: Config, out: Path) -> None:
    """Create the run directory (clearing an old run when ``overwrite`` is set).

    Raises:
        UserError: The folder cannot be created.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"output_dir {cfg.output_dir} cannot be created ({e.strerror}).") from None
    if cfg.overwrite and not cfg.resume:
        for p in out.glob("checkpoint-*"):
            shutil.rmtree(p, ignore_errors=True)
        for name in ("metrics.jsonl", *_FINISHED_MARKERS):
            (out / name).unlink(missing_ok=True)


def build_optimizer(model, tcfg: TrainConfig):
    """AdamW over trainable parameters; no weight decay on biases and norms.

    Trainable parameters are given float32 storage first (the dtype policy of
    :mod:`llamatune.model`), so master weights and AdamW moments are float32 whatever the
    frozen base computes in.
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


def epoch_batches(
    samples: list[dict], tcfg: TrainConfig, epoch: int, pad_id: int, shuffle: bool = True
) -> list[dict]:
    """The micro-batches of one epoch, in a seeded order that depends only on the epoch.

    Without packing, each micro-batch holds ``batch_size`` samples padded to the longest
    (with ``group_by_length``, samples of similar length). With packing, samples are packed
    into ``max_length`` rows, ``batch_size`` rows a batch.
    """
    from llamatune.data.collate import pack, packed_batch, pad_batch

    order = list(range(len(samples)))
    rng = random.Random(tcfg.seed * 1_000_003 + epoch)
    if shuffle:
        rng.shuffle(order)
    bs = tcfg.batch_size
    if tcfg.packing:
        rows = pack([samples[i] for i in order], tcfg.max_length)
        return [packed_batch(rows[i : i + bs], pad_id) for i in range(0, len(rows), bs)]
    groups = [order[i : i + bs] for i in range(0, len(order), bs)]
    if shuffle and tcfg.group_by_length:
        # Sort within chunks of 64 batches so each batch holds similar lengths (little padding),
        # then shuffle the batches so the order still looks random to the optimizer.
        chunk = 64 * bs
        groups = []
        for c in range(0, len(order), chunk):
            part = sorted(order[c : c + chunk], key=lambda i: len(samples[i]["input_ids"]))
            groups += [part[i : i + bs] for i in range(0, len(part), bs)]
        rng.shuffle(groups)
    return [pad_batch([samples[i] for i in g], pad_id) for g in groups]


def lm_loss_sum(model, batch: dict, fused: bool = True):
    """Summed next-token cross-entropy over supervised positions, and their count.

    The output head runs only on positions whose next token is supervised, so no
    full-vocabulary logits are made for prompts or padding.

    Args:
        model: A causal LM (optionally wrapped by peft).
        batch: ``input_ids``, ``labels`` (``-100`` where unsupervised) and optionally
            ``attention_mask`` / ``position_ids``.
        fused: Compute the head and loss chunk by chunk with the gradient made in the forward
            pass (:mod:`llamatune._head_loss`), so no ``[n, vocab]`` tensor outlives its chunk.

    Returns:
        ``(loss_sum, n_supervised)`` as tensors.
    """
    import torch
    import torch.nn.functional as F

    from llamatune.model import unwrap_model

    inner = unwrap_model(model)
    kwargs = {"input_ids": batch["input_ids"], "use_cache": False}
    for k in ("attention_mask", "position_ids"):
        if k in batch:
            kwargs[k] = batch[k]
    hidden = inner.model(**kwargs).last_hidden_state
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    h = hidden[:, :-1][mask]
    head = inner.get_output_embeddings()
    if fused and type(head) is torch.nn.Linear and head.bias is None:
        # The usual case: chunked, with no [n, vocab] log-softmax kept for the backward pass.
        from llamatune._head_loss import head_cross_entropy_sum

        loss = head_cross_entropy_sum(h, head.weight, labels[mask])
    else:
        logits = head(h).float()
        loss = F.cross_entropy(logits, labels[mask], reduction="sum")
    return loss, mask.sum()


def trainable_state_dict(model) -> dict:
    """The trainable tensors (adapter and any fully trained modules)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl``."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and path.exists():
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
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(k + "\n" for k in keep))
            os.replace(tmp, path)

    def write(self, row: dict) -> None:
        """Append a row and flush."""
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


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


def _save_optimizer(optimizer, folder: Path) -> None:
    from safetensors.torch import save_file

    sd = optimizer.state_dict()
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


def _load_optimizer(optimizer, folder: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "optimizer.safetensors"))
    meta = json.loads((folder / "optimizer.json").read_text())
    state: dict = {int(k): dict(v) for k, v in meta["state"].items()}
    for name, t in tensors.items():
        idx, _, key = name.partition(".")
        state.setdefault(int(idx), {})[key] = t
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, state: dict,
                    keep: int, save_model) -> Path:
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

    Returns:
        The checkpoint folder.
    """
    import torch
    from safetensors.torch import save_file

    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, tmp)
    _save_optimizer(optimizer, tmp)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / "rng.safetensors"))
    full_state = dict(state, step=step, scheduler=scheduler.state_dict(),
                      python_rng=_py_rng_to_json(random.getstate()), time=time.time())
    # Written last: a checkpoint folder with trainer_state.json is complete.
    (tmp / "trainer_state.json").write_text(json.dumps(full_state))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    ckpts = sorted(_checkpoints(run_dir), key=lambda p: int(p.name.split("-")[1]))
    for old in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _checkpoints(run_dir: Path) -> list[Path]:
    out = []
    for p in run_dir.glob("checkpoint-*"):
        tail = p.name.split("-", 1)[1]
        if tail.isdigit() and (p / "trainer_state.json").is_file():
            out.append(p)
    return out


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, or ``None``."""
    ckpts = _checkpoints(run_dir)
    return max(ckpts, key=lambda p: int(p.name.split("-")[1])) if ckpts else None


def load_checkpoint(folder: Path, optimizer, scheduler, lr: float | None = None) -> dict:
    """Restore optimizer, scheduler and RNG state; return the saved loop state.

    Args:
        folder: A complete checkpoint.
        optimizer: Built as for a new run.
        scheduler: Built as for a new run (its schedule shape comes from the current recipe).
        lr: The current ``train.lr``. A resumed run uses it, so a run stopped by a NaN can
            continue from its last good checkpoint at a lower rate (torch would restore the
            saved peak rate with the scheduler state).
    """
    import torch
    from safetensors.torch import load_file

    _load_optimizer(optimizer, folder)
    state = json.loads((folder / "trainer_state.json").read_text())
    scheduler.load_state_dict(state["scheduler"])
    if lr is not None and any(base != lr for base in scheduler.base_lrs):
        scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
        for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
            group["lr"] = lr * factor(scheduler.last_epoch)
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    rng = load_file(str(folder / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
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
    if ckpt is None:
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


def check_finite(step: int, loss: float, grad_norm: float | None, run_dir: Path) -> None:
    """Stop before ``optimizer.step()`` when the step's loss or gradient norm is not finite.

    Args:
        step: The step about to be applied (1-based).
        loss: Its loss.
        grad_norm: Its gradient norm before clipping (``None`` when not computed).
        run_dir: Where the last good checkpoint is.

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
    raise TrainingDiverged(f"training diverged at step {step}: {what}. The run stopped before "
                           f"applying that update and wrote no final adapter. {then}")


def _py_rng_to_json(st):
    return [st[0], list(st[1]), st[2]]


def _py_rng_from_json(st):
    return (st[0], tuple(st[1]), st[2])


def write_run_files(run_dir: Path, cfg: Config, tokenizer, template: str) -> None:
    """Resolved config plus tokenizer with the run's chat template, so the folder is self-contained."""
    from llamatune.data.templates import to_jinja

    save_config(cfg, run_dir / "config.yaml")
    tokenizer.chat_template = to_jinja(tokenizer, template, cfg.data.system)
    tokenizer.save_pretrained(str(run_dir))
