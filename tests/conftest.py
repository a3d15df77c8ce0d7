"""Test-session set-up shared by every test module.

Triton reads TRITON_INTERPRET when it is first imported, and any module may import it first (the
backend registry loads every plugin), so it is set here, before collection, on machines with no GPU.

Every run draws the same numbers: each test starts from fixed seeds of Python's, NumPy's and
torch's global generators (whatever ran before it), and Hypothesis draws the same examples on
every run (profile ``derandomized``; ``--hypothesis-profile default`` explores afresh).
"""

import os
import random
import shutil
import sys

import numpy as np
import pytest
from hypothesis import settings

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile("derandomized", derandomize=True)
settings.load_profile("derandomized")  # the plugin's --hypothesis-profile, read later, wins


@pytest.fixture(autouse=True, scope="session")
def _private_tuning_db(tmp_path_factory):
    """Tests never read or write the user's tuning database (~/.cache/attncc/tuning.db)."""
    os.environ["ATTNCC_DB"] = str(tmp_path_factory.mktemp("attncc-db") / "tuning.db")
    yield


@pytest.fixture(autouse=True)
def _own_tuning_db(_private_tuning_db, tmp_path_factory, monkeypatch):
    """Each test has a default tuning database of its own: no record one test stores (a hint's
    verdict, a tune) serves another. (Module-scoped fixtures share the session's.)"""
    monkeypatch.setenv("ATTNCC_DB", str(tmp_path_factory.mktemp("attncc-db") / "tuning.db"))


@pytest.fixture(autouse=True)
def _fixed_seeds():
    """The global generators seeded before each test, so no test's values depend on the tests
    that ran before it (or on none having run: a single test selected with -k)."""
    random.seed(0)
    np.random.seed(0)
    torch = sys.modules.get("torch")  # not imported here: tests that never use torch stay fast
    if torch is not None:
        torch.manual_seed(0)
