"""Recipe classes, one per stage, and the one interface the shared loop drives.

A stage class is a :class:`BatchStage` (it gives micro-batches and a summed loss; the loop
counts, normalizes and steps: SFT, the reward model, DPO) or an :class:`IterativeStage` (it
does one whole step on the :class:`~llamatune.training.Updates` it is handed and returns a
:class:`StepResult`: PPO). The contract runs one way: the loop asks, the stage answers; a
stage never reaches into the loop and the loop never reads a stage's config section. Which
stages exist, and what data each reads, is the registry :data:`llamatune.config.TRAIN_STAGES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llamatune.config import TRAIN_STAGES
from llamatune.errors import UserError

__all__ = ["STAGE_DATA", "BatchStage", "IterativeStage", "Stage", "StepResult", "claim_stage",
           "stage_data"]

STAGE_DATA = {name: spec.data for name, spec in TRAIN_STAGES.items()}
"""The kind of data each training stage reads (see :mod:`llamatune.data.prepare`)."""


@dataclass
class StepResult:
    """What one step gives the loop to log."""

    loss: float
    """The step's loss (per unit: token, pair)."""
    figures: dict
    """The stage's own figures for the ``metrics.jsonl`` row."""
    tokens: int
    """Tokens the step processed (for ``tokens_per_s``)."""
    grad_norm: float | None = None
    """The gradient norm before clipping (``None`` when not computed)."""


class Stage:
    """What every stage's recipe class provides, and the end it shares.

    ``setup`` sets ``self.loop`` (a :class:`~llamatune.training.Loop`), ``self.loaded`` and
    ``self.run_dir``; ``train``, ``save_checkpoint`` and ``cleanup`` are then the same for
    every stage.
    """

    name: str
    """Short name for the progress bar and the alarms (``sft``, ``rm``, ``dpo``, ``ppo``)."""
    saved = "adapter"
    """What the final files hold, for the last message (``"the PPO policy adapter"``)."""
    alarm_context: dict | None = None
    """What :class:`llamatune.health.Monitor` needs to know of the data (``None``: nothing)."""
    eval_at_start = False
    """Evaluate the starting model before the first step (PPO's in-run eval from 0)."""

    def setup(self) -> None:
        """Check inputs, load data, model and optimizer; resume if asked."""
        raise NotImplementedError

    def batches(self, epoch: int) -> list[dict]:
        """The epoch's micro-batches (or, for an iterative stage, its steps' inputs), seeded."""
        raise NotImplementedError

    def evaluate(self) -> dict:
        """Held-out figures (``eval_loss`` and the stage's own), or ``{}``; run without gradients."""
        return {}

    def batch_text(self, tc) -> str:
        """What one process contributes to a step, for the launcher's line."""
        return f"{tc.batch_size} x {tc.grad_accum} accumulation"

    def state(self) -> dict | None:
        """What a checkpoint keeps of the stage beyond the weights (``None``: nothing)."""
        return None

    def load_state(self, state: dict) -> None:
        """Restore :meth:`state` from a checkpoint."""

    def train(self) -> None:
        """Run the steps (the shared loop)."""
        self.loop.run()

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-STEP/`` (trainable weights, optimizer, schedule, RNG, position)."""
        return self.loop.save_checkpoint()

    def cleanup(self) -> None:
        """Write the trainable adapter and heads beside the config, tokenizer and template."""
        from llamatune import dist
        from llamatune.model import save_trainable
        from llamatune.rundir import write_final

        with dist.whole_trainables(self.loaded.net):  # sharded: every process gathers
            write_final(self.run_dir, lambda folder: save_trainable(self.loaded, folder))
        print(f"saved {self.saved}, tokenizer and config to {self.run_dir}", flush=True)


class BatchStage(Stage):
    """A stage whose step the loop takes: ``train.grad_accum`` micro-batches, one update."""

    def count(self, batch: dict) -> int:
        """The units (supervised tokens, pairs) a micro-batch's loss sums over."""
        raise NotImplementedError

    def loss(self, batch: dict):
        """``(loss_sum, metric_sums)``: the summed loss (a tensor) and per-unit figures summed."""
        raise NotImplementedError


class IterativeStage(Stage):
    """A stage that takes each step itself (PPO: a rollout, scoring, its updates)."""

    def iteration(self, step: int, batch: dict, updates) -> StepResult:
        """Step ``step`` (0-based) on ``batch`` (the next of :meth:`batches`).

        Args:
            step: Steps done before this one.
            batch: This step's input.
            updates: The :class:`~llamatune.training.Updates` to backpropagate and apply.
        """
        raise NotImplementedError


def claim_stage(cfg, command: str, recipe_path: str | None = None) -> None:
    """Check that a recipe is for the stage about to run it, and fill in ``stage`` if unset.

    Raises:
        UserError: The recipe names another stage.
    """
    if cfg.stage is None:
        cfg.stage = command
    elif cfg.stage != command:
        name = recipe_path or "this recipe"
        raise UserError(
            f"{name} is a `stage: {cfg.stage}` recipe, so `llamatune {command}` cannot run it; "
            f"run `llamatune {cfg.stage} {name}`, or change its stage: key."
        )


def stage_data(cfg, recipe_path: str | None = None) -> tuple[str, str]:
    """``(data kind, command)`` of a recipe's stage, for commands that read any stage's data.

    Raises:
        UserError: The recipe has no ``stage:`` key, or names a stage without data of its own.
    """
    if cfg.stage is None:
        name = recipe_path or "the recipe"
        raise UserError(
            f"{name} has no stage: key, so it is not clear whose data to read; add "
            f"`stage: sft` (or {', '.join(k for k in STAGE_DATA if k != 'sft')}) at its top."
        )
    if cfg.stage not in STAGE_DATA:
        raise UserError(f"stage {cfg.stage!r} reads no data of its own; validate or preview "
                        "the recipes of its stages.")
    return STAGE_DATA[cfg.stage], f"llamatune {cfg.stage}"
