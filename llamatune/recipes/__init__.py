"""Recipe classes: one per stage, each with ``setup``, ``train``, ``save_checkpoint``, ``cleanup``.

Stages share plain functions (``llamatune.training``, ``llamatune.model``), not a base
class; :class:`Recipe` only states the interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from llamatune.errors import UserError

__all__ = ["STAGE_DATA", "Recipe", "claim_stage", "stage_data"]

STAGE_DATA = {"sft": "conversations", "rm": "pairs", "dpo": "pairs", "ppo": "prompts"}
"""The kind of data each training stage reads (see :mod:`llamatune.data.prepare`)."""


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
