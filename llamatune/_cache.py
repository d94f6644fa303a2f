"""Where llamatune caches converted models and tokenized data."""

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """The cache root: ``$LLAMATUNE_CACHE``, else ``$XDG_CACHE_HOME/llamatune`` (``~/.cache``)."""
    root = os.environ.get("LLAMATUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llamatune"
    )
    return Path(root)
