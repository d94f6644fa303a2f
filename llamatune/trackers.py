"""Optional experiment trackers (``train.report_to``): every ``metrics.jsonl`` row, also sent on.

TensorBoard (``tensorboard`` installed: event files in ``RUN_DIR/tensorboard``), Weights &
Biases (``wandb``) and Trackio (``trackio``, the same calls as wandb). None is required: a
recipe that names one that is not installed is refused before the model loads, naming the
package to install; ``metrics.jsonl`` is written whatever the trackers do.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from llamatune.errors import UserError

__all__ = ["Trackers", "check_installed"]

_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def check_installed(names: list[str]) -> None:
    """Raise a :class:`UserError` naming what to install for trackers that are missing."""
    missing = [n for n in names if importlib.util.find_spec(_PACKAGE[n]) is None]
    if missing:
        pkgs = " ".join(_PACKAGE[n] for n in missing)
        raise UserError(f"train.report_to names {', '.join(missing)}, which is not installed: "
                        f"pip install {pkgs}, or drop it from train.report_to.")


class Trackers:
    """The trackers of one run (the main process's).

    Args:
        names: ``train.report_to`` names.
        run_dir: The run directory (TensorBoard writes beneath it; the run's name is its name).
        config: The resolved config as a plain dict (sent to wandb and trackio).
        project: The project name shown by wandb and trackio.
    """

    def __init__(self, names: list[str], run_dir: Path, config: dict, project: str = "llamatune"):
        self._tb = self._wandb = self._trackio = None
        name = Path(run_dir).name
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if "wandb" in names:
            import wandb

            self._wandb = wandb.init(project=project, name=name, config=config,
                                     dir=str(run_dir), resume="allow")
        if "trackio" in names:
            import trackio

            trackio.init(project=project, name=name, config=config, resume="allow")
            self._trackio = trackio

    def log(self, row: dict) -> None:
        """Send a metrics row's numbers, at its ``step``."""
        step = int(row.get("step", 0))
        figures = {k: float(v) for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in figures.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(figures, step=step)
        if self._trackio is not None:
            self._trackio.log(figures, step=step)

    def close(self) -> None:
        """Flush and finish every tracker."""
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._trackio is not None:
            self._trackio.finish()
