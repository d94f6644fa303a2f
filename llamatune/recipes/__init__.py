"""Recipe classes: one per stage, each with ``setup``, ``train``, ``save_checkpoint``, ``cleanup``.

Stages share plain functions (``llamatune.training``, ``llamatune.model``), not a base
class; :class:`Recipe` only states the interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from llamatune.errors import UserError

__all__ = ["Recipe", "resolve_adapter_dir"]


class Recipe(Protocol):
    """What every stage's recipe class provides."""

    def setup(self) -> None:
        """Check inputs, load data, model and optimizer; resume if asked."""

    def train(self) -> None:
        """Run the loop."""

    def save_checkpoint(self) -> Path:
        """Write a complete checkpoint and return its folder."""

    def cleanup(self) -> None:
        """Write the final outputs into the run directory."""


def resolve_adapter_dir(path: str, key: str = "model.adapter") -> str:
    """A run directory or adapter folder holding ``adapter_config.json``.

    Raises:
        UserError: No adapter there.
    """
    p = Path(path).expanduser()
    if (p / "adapter_config.json").is_file():
        return str(p)
    raise UserError(
        f"{key} {path}: no adapter_config.json there; point it at a finished llamatune run "
        "directory (or a peft adapter folder)."
    )
