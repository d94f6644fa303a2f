"""The step loop every stage shares.

A stage (:mod:`llamatune.recipes`) supplies what differs; :class:`Loop` does the rest the
same way for every stage. A :class:`~llamatune.recipes.BatchStage` gives micro-batches and
a loss returning the *summed* loss plus metric sums, and the loop does the step: gradient
accumulation normalized over the whole window (every token, or pair, weighs the same
whatever micro-batch it landed in), clipping, the optimizer and schedule. An
:class:`~llamatune.recipes.IterativeStage` (PPO) does its own step on the :class:`Updates`
it is handed and returns a :class:`~llamatune.recipes.StepResult`. Either way the loop
writes the ``metrics.jsonl`` rows, evaluates on schedule, checkpoints atomically, resumes
exactly, stops before a NaN update and, on a stop signal, at a step boundary.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from llamatune import _stop, dist
from llamatune.config import Config, TrainConfig
from llamatune.errors import UserError
from llamatune.recipes import IterativeStage, Stage, StepResult
from llamatune.rundir import checkpoints, latest_checkpoint
from llamatune.training.checkpoint import load_checkpoint, save_checkpoint
from llamatune.training.optim import build_optimizer, build_scheduler
from llamatune.training.output import MetricsWriter, Progress, draw_plots

__all__ = ["Loop", "TrainingDiverged", "Updates", "check_finite", "run_stage"]


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


class Updates:
    """The trainable side of a run: the wrapped net, its optimizer and schedule.

    What a stage's step needs to learn: :meth:`backward` and :meth:`apply`. Under a launcher
    the net is wrapped (DDP, FSDP2) before the optimizer sees its weights; DeepSpeed's engine
    takes net and optimizer together.

    Args:
        net: The :class:`~llamatune.net.Net` whose trainable parameters are optimized.
        tc: ``train.*``.
        total_steps: Steps the schedule spans.
        run_dir: Where the last good checkpoint is (for the divergence message).
    """

    def __init__(self, net, tc: TrainConfig, total_steps: int, run_dir: Path):
        self.tc, self.run_dir = tc, run_dir
        self.step = 0
        """Steps applied so far (the loop's count)."""
        deepspeed = dist.world().zero is not None
        if not deepspeed:
            self.wrapped = dist.prepare(net)
        self.optimizer = build_optimizer(net, tc, allocate=not deepspeed)
        self.groups = [list(g["params"]) for g in self.optimizer.param_groups]  # as built
        self.params = [p for g in self.groups for p in g]
        if deepspeed:
            self.wrapped = dist.prepare(net, self.optimizer, batch_size=tc.batch_size,
                                        max_grad_norm=tc.max_grad_norm)
        self.scheduler = build_scheduler(self.optimizer, tc, total_steps)

    def backward(self, loss, boundary: bool = True) -> None:
        """Backpropagate ``loss``; ``boundary``: the last backward before :meth:`apply`."""
        dist.backward(self.wrapped, loss, boundary=boundary)

    def no_sync(self, enabled: bool):
        """A context in which backward passes do not synchronize gradients (DDP)."""
        return dist.no_sync(self.wrapped, enabled=enabled)

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

        tc, at = self.tc, self.step + 1
        grad_norm = None
        if dist.world().zero is not None:
            check_finite(at, loss, None, self.run_dir)
            grad_norm = dist.step(self.wrapped, self.params)
            grad_norm = grad_norm if tc.max_grad_norm > 0 else None
            check_finite(at, loss, grad_norm, self.run_dir, applied=True)
            return grad_norm
        if tc.max_grad_norm > 0:  # under DDP every process holds the same reduced gradients
            norm = torch.nn.utils.clip_grad_norm_(self.params, tc.max_grad_norm)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        check_finite(at, loss, grad_norm, self.run_dir)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)
        return grad_norm


class Loop:
    """The optimizer steps of a stage, the same for every stage.

    Args:
        cfg: The stage's config (``train.*``).
        stage: The :class:`~llamatune.recipes.Stage`.
        loaded: The :class:`~llamatune.model.Loaded` model (its net's trainable parameters
            are optimized; its trainable adapter and heads are what checkpoints save).
        begun: The stage's :class:`~llamatune.training.begin.Start` (run directory, data
            order, resume point).
        has_eval: Whether the stage has held-out data to evaluate.
    """

    def __init__(self, cfg: Config, stage: Stage, loaded, begun, has_eval: bool):
        from llamatune.model import fp32_trainable, load_trainable

        self.tc, self.stage, self.loaded = cfg.train, stage, loaded
        self.run_dir, self.data_order = begun.run_dir, begun.data_order
        self.has_eval = has_eval
        self.step = self.epoch = self.micro = 0  # micro: micro-batches of this epoch consumed
        self._batches, self._batches_epoch = None, -1
        tc = cfg.train
        per_step = 1 if isinstance(stage, IterativeStage) else tc.grad_accum
        self.steps_per_epoch = max(1, math.ceil(len(stage.batches(0)) / per_step))
        self.total_steps = tc.step_cap or math.ceil(tc.epochs * self.steps_per_epoch)
        fp32_trainable(loaded.net)
        if begun.resume_from is not None:  # into float32 masters, before DDP copies them
            load_trainable(loaded, begun.resume_from)
        self.updates = Updates(loaded.net, tc, self.total_steps, self.run_dir)
        w = dist.world()
        if w.accelerator is not None:  # launched (several processes, or one that shards)
            n = f"{w.size} process{'es' if w.size > 1 else ''}"
            print(f"{n} ({w.scheme}): global batch {stage.batch_text(tc)} x {n}", flush=True)
        resume_step = None
        if begun.resume_from is not None:
            u = self.updates
            state = load_checkpoint(begun.resume_from, u.optimizer, u.scheduler, tc.lr, u.groups)
            self.step, self.epoch, self.micro = state["step"], state["epoch"], state["micro"]
            if "stage" in state:
                stage.load_state(state["stage"])
            resume_step = self.step
            print(f"resumed from {begun.resume_from} (step {self.step})", flush=True)
        self.metrics = _metrics_writer(cfg, stage, self.run_dir, resume_step)

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

    def run(self) -> None:
        """Run the steps, logging, evaluating and checkpointing on schedule.

        A step is one optimizer step over ``train.grad_accum`` micro-batches of a batch stage,
        or one iteration of an iterative stage (PPO: a rollout and its updates).
        """
        tc, stage = self.tc, self.stage
        if stage.eval_at_start and self.step == 0 and self.has_eval:
            self._log_eval(None)
        self.loaded.net.train()
        bar = Progress(self.total_steps, self.step, tc.progress and dist.world().main, stage.name)
        t_log, tokens_log = time.perf_counter(), 0
        while self.step < self.total_steps:
            _stop_point(self, bar)
            lr = self.updates.scheduler.get_last_lr()[0]
            self.updates.step = self.step
            if isinstance(stage, IterativeStage):
                result = stage.iteration(self.step, self.next_batch(), self.updates)
            else:
                result = _window_step(self)
            self.updates.scheduler.step()
            self.step += 1
            tokens_log += result.tokens
            if self.step % tc.log_every == 0 or self.step == self.total_steps:
                dt = time.perf_counter() - t_log
                self._log_row(result, lr, tokens_log / dt, bar)
                t_log, tokens_log = time.perf_counter(), 0
            else:
                bar.update(loss=result.loss)
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

    def _log_row(self, result: StepResult, lr: float, tok_s: float, bar) -> None:
        row = {"step": self.step, "epoch": round(self.epoch_progress, 4),
               "loss": round(result.loss, 6), "lr": lr, "tokens_per_s": round(tok_s, 2)}
        row.update({k: round(v, 6) if isinstance(v, float) else v
                    for k, v in result.figures.items()})
        if result.grad_norm is not None:
            row["grad_norm"] = round(result.grad_norm, 6)
        self.metrics.write(row)
        shown = {k: v for k, v in result.figures.items() if k in ("accuracy", "reward_mean")}
        bar.update(loss=result.loss, **shown, tok_s=round(tok_s))

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

        stage_state = self.stage.state()
        u = self.updates
        return save_checkpoint(
            self.run_dir, self.step, self.loaded, u.optimizer, u.scheduler,
            {"epoch": self.epoch, "micro": self.micro, "data_order": self.data_order,
             **({"stage": stage_state} if stage_state is not None else {})},
            self.tc.keep_checkpoints, save_trainable, u.groups)


def _window_step(loop: Loop) -> StepResult:
    """One optimizer step of a batch stage over ``train.grad_accum`` micro-batches.

    Normalized over the whole window, and under a launcher over every process's window
    (the count is summed across processes first, and the wrapper's gradient average is
    undone), so every unit weighs the same wherever it landed: N processes at the same
    global batch take the step one process would.
    """
    stage, updates, size = loop.stage, loop.updates, dist.world().size
    window = [loop.next_batch() for _ in range(loop.tc.grad_accum)]
    real = [not bool(b.get("dummy", False)) for b in window]
    count = dist.all_sum([sum(stage.count(b) for b, r in zip(window, real) if r)])[0]
    step_loss, sums, tokens = 0.0, {}, 0
    for i, (b, r) in enumerate(zip(window, real)):
        # Gradients are synchronized on the window's last backward only.
        with updates.no_sync(enabled=i < len(window) - 1):
            loss_sum, figures = stage.loss(b)
            if not r:  # a dummy part: in step with the other processes, no weight
                loss_sum, figures = loss_sum * 0, {k: 0.0 for k in figures}
            updates.backward(loss_sum * (size / count), boundary=i == len(window) - 1)
        step_loss += loss_sum.item()
        for k, v in figures.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        tokens += int(b["n_real"]) if r else 0
    keys = sorted(sums)
    total = dist.all_sum([step_loss, tokens, *(sums[k] for k in keys)])
    grad_norm = updates.apply(total[0] / count)
    return StepResult(total[0] / count, {k: v / count for k, v in zip(keys, total[2:])},
                      int(total[1]), grad_norm)


def _metrics_writer(cfg: Config, stage: Stage, run_dir: Path,
                    resume_step: int | None) -> MetricsWriter:
    """``metrics.jsonl``'s writer, with the trackers and alarms the recipe asks for."""
    tc = cfg.train
    trackers = None
    if tc.trackers and dist.world().main:
        from llamatune.config import config_to_dict
        from llamatune.trackers import Trackers

        trackers = Trackers(tc.trackers, run_dir, config_to_dict(cfg))
    from llamatune.health import Monitor

    monitor = Monitor(stage.name, stage.alarm_context) if tc.alarms else None
    return MetricsWriter(run_dir / "metrics.jsonl", resume_step, trackers, monitor)


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


def run_stage(recipe: Stage) -> int:
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
