"""Packaging step that pyproject.toml cannot express: ship ``tuning_db/*.jsonl`` inside the wheel.

The pre-tuned records live at the repository root (``tuning_db/``, the path the project documents),
outside every package, so setuptools' package data cannot reach them. ``build_py`` copies them to
``attncc/tuning_db/`` in the build tree; ``attncc.db.exchange.shipped_dir`` finds that copy through
``importlib.resources`` when no source checkout is around. Editable installs need no copy: they
read the repository folder. Everything else is configured in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = Path(__file__).resolve().parent / "tuning_db"


class BuildPyWithTuningRecords(build_py):
    """``build_py`` that also copies the shipped tuning records into the package."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "attncc" / "tuning_db"
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(SHIPPED.glob("*.jsonl")):
            shutil.copyfile(path, target / path.name)


setup(cmdclass={"build_py": BuildPyWithTuningRecords})
