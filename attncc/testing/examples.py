"""The example spec files that every backend's conformance suite runs over."""

from __future__ import annotations

import os
from pathlib import Path

from attncc.spec.load import EXTENSIONS

#: Environment variable naming another folder of example specs (instead of the repo's examples/).
ENV = "ATTNCC_EXAMPLES"


def examples_dir() -> Path:
    """``$ATTNCC_EXAMPLES`` if set, else ``examples/`` at the root of the attncc checkout."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    return Path(__file__).resolve().parents[2] / "examples"


def example_specs(folder: str | os.PathLike | None = None) -> list[Path]:
    """Every spec file (``.yaml .yml .toml .json``) directly in ``folder``, sorted by name.

    ``folder`` defaults to ``examples_dir()``. Whatever spec files are there are picked up; a
    missing folder gives an empty list.
    """
    root = Path(folder) if folder is not None else examples_dir()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
