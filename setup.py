"""Build hook: ship the recipe YAMLs and data sets inside the package.

``recipes/`` and ``datasets/`` live at the top of the repository (``datasets/`` must never be
a package: it would shadow the ``datasets`` library). Wheels get copies under
``llamatune/_shipped/`` so ``llamatune ls`` and ``llamatune cp`` work from an installed copy;
source checkouts and editable installs read the top-level folders directly.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithShipped(build_py):
    """Copy recipes/*.yaml and datasets/*.jsonl into the built package."""

    def run(self):
        """Build as usual, then copy the shipped files next to the package."""
        super().run()
        root = Path(__file__).parent
        for src, pattern in (("recipes", "*.yaml"), ("datasets", "*.jsonl")):
            dest = Path(self.build_lib) / "llamatune" / "_shipped" / src
            dest.mkdir(parents=True, exist_ok=True)
            for f in sorted((root / src).glob(pattern)):
                shutil.copy2(f, dest / f.name)


setup(cmdclass={"build_py": BuildWithShipped})
