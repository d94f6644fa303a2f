"""The training core: the step loop every stage shares and its pieces, one job a module.

* :mod:`~llamatune.training.begin`: how a stage opens (the cheap checks, the data, the
  resume point, the run directory): :func:`start`.
* :mod:`~llamatune.training.batches`: one epoch's micro-batches in a seeded order, sharded
  under a launcher (conversations padded or packed; preference pairs one row each).
* :mod:`~llamatune.training.optim`: AdamW and its schedule; seeding.
* :mod:`~llamatune.training.loop`: :class:`Loop` (the steps, logging, evaluation,
  checkpoints, the stop before a NaN and on a signal), :class:`Updates` (backward and
  apply, what an iterative stage learns through) and :func:`run_stage`.
* :mod:`~llamatune.training.checkpoint`: atomic checkpoints and the checked resume.
* :mod:`~llamatune.training.output`: ``metrics.jsonl``, the progress bar and the plots.

The stage interface the loop drives is :class:`llamatune.recipes.Stage`.
"""

from llamatune.training.batches import Part, batch_groups, epoch_batches, n_pairs, pair_batches
from llamatune.training.begin import Start, start
from llamatune.training.checkpoint import (
    DATA_KEY,
    data_order,
    load_checkpoint,
    resume_checkpoint,
    save_checkpoint,
)
from llamatune.training.loop import Loop, TrainingDiverged, Updates, check_finite, run_stage
from llamatune.training.optim import build_optimizer, build_scheduler, set_seed
from llamatune.training.output import MetricsWriter, Progress, draw_plots

__all__ = [
    "DATA_KEY",
    "Loop",
    "MetricsWriter",
    "Part",
    "Progress",
    "Start",
    "TrainingDiverged",
    "Updates",
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
    "resume_checkpoint",
    "run_stage",
    "save_checkpoint",
    "set_seed",
    "start",
]
