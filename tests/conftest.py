"""Test-session set-up shared by every test module.

Triton reads TRITON_INTERPRET when it is first imported, and any module may import it first (the
backend registry loads every plugin), so it is set here, before collection, on machines with no GPU.
"""

import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_tuning_db(tmp_path_factory):
    """Tests never read or write the user's tuning database (~/.cache/attncc/tuning.db)."""
    os.environ["ATTNCC_DB"] = str(tmp_path_factory.mktemp("attncc-db") / "tuning.db")
    yield
