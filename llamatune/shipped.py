"""Where the shipped recipe configs and data sets are, in a checkout or an installed copy."""

from __future__ import annotations

from pathlib import Path

__all__ = ["list_recipes", "shipped_datasets_dir", "shipped_recipes_dir"]

_PKG = Path(__file__).resolve().parent


def _find(name: str) -> Path | None:
    for cand in (_PKG.parent / name, _PKG / "_shipped" / name):
        if cand.is_dir():
            return cand
    return None


def shipped_recipes_dir() -> Path | None:
    """The folder of shipped recipe YAMLs."""
    return _find("recipes")


def shipped_datasets_dir() -> Path | None:
    """The folder of shipped data sets."""
    return _find("datasets")


def list_recipes() -> dict[str, Path]:
    """Shipped recipe name (file stem) to path."""
    d = shipped_recipes_dir()
    return {p.stem: p for p in sorted(d.glob("*.yaml"))} if d else {}
