"""attncc.compile: backend choice, config checks, and the tuning database consulted first."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import attncc
from attncc.backends import registry
from attncc.db.key import Key, Record
from attncc.db.store import Store
from attncc.errors import BackendError
from attncc.target import default_target
from attncc.tuning.measure import measurements

SPEC = "examples/sliding_window.yaml"


def _store_record(db, config, backend="numpy", median=1e-3):
    spec = attncc.load_spec(SPEC)
    target = default_target()
    chosen = registry.get(backend)
    key = Key(spec.hash, "q64-k64", "float32", f"{chosen.name}@{chosen.version}", target.key(3))
    record = Record(key, spec.name, config, median, 1e-5, 7, target.to_dict(), {})
    Store(db).put(record)
    return record


def test_a_database_hit_runs_no_benchmark_and_the_kernel_names_its_record(tmp_path):
    db = tmp_path / "t.db"
    record = _store_record(db, {"block_m": 32, "block_n": 16})
    before = measurements()
    kernel = attncc.compile(SPEC, backend="numpy", seq=64, db=db)
    assert measurements() == before
    assert kernel.record == record
    assert kernel.config["block_m"] == 32 and kernel.config["block_n"] == 16
    assert record.id in kernel.selection and "exact match" in kernel.selection
    q = np.random.default_rng(0).standard_normal((1, 2, 64, 16)).astype(np.float32)
    out = kernel(q, q, q)
    assert np.abs(out - attncc.reference(SPEC, q, q, q)).max() < 1e-5


def test_a_miss_uses_defaults_and_says_so(tmp_path):
    kernel = attncc.compile(SPEC, backend="numpy", seq=64, db=tmp_path / "empty.db")
    assert kernel.record is None
    assert "default config" in kernel.selection


def test_an_explicit_config_wins_and_bad_configs_are_clear_errors(tmp_path):
    db = tmp_path / "t.db"
    _store_record(db, {"block_m": 32, "block_n": 16})
    kernel = attncc.compile(SPEC, backend="numpy", config={"block_m": 16}, db=db)
    assert kernel.config["block_m"] == 16 and kernel.record is None
    with pytest.raises(BackendError, match="unknown tunable 'BLOCK'"):
        attncc.compile(SPEC, backend="numpy", config={"BLOCK": 3})
    with pytest.raises(BackendError, match="block_m='64' is not a value"):
        attncc.compile(SPEC, backend="numpy", config={"block_m": "64"})
    with pytest.raises(BackendError, match="block_m=7 is not a value"):
        attncc.compile(SPEC, backend="numpy", config={"block_m": 7})
    with pytest.raises(BackendError, match="unknown backend 'nope'"):
        attncc.compile(SPEC, backend="nope")


def test_auto_prefers_the_fastest_record_and_otherwise_the_priority(tmp_path):
    db = tmp_path / "t.db"
    _store_record(db, {"block_m": 32, "block_n": 32}, backend="numpy", median=1e-6)
    kernel = attncc.compile(SPEC, seq=64, db=db, backend="auto")
    candidates = [n for n, b in registry.available().items() if not isinstance(b, Exception)
                  and b.supports(attncc.api.lower(attncc.load_spec(SPEC)), default_target())]
    if len(candidates) > 1:  # the other backends have no record at q64-k64: priority decides
        assert kernel.backend == "torch" and "highest priority" in kernel.selection
    for name in candidates:
        if name != "numpy":
            _store_record(db, {}, backend=name, median=1.0)
    kernel = attncc.compile(SPEC, seq=64, db=db)
    assert kernel.backend == "numpy" and "fastest tuning record" in kernel.selection
    # without seq= the records' times are not compared (they may be of other buckets)
    kernel = attncc.compile(SPEC, db=db)
    if len(candidates) > 1:
        assert kernel.backend == "torch" and "highest priority" in kernel.selection


def test_a_record_whose_config_no_longer_fits_is_skipped_with_a_warning(tmp_path):
    db = tmp_path / "t.db"
    _store_record(db, {"block_m": "64", "block_n": 16})
    with pytest.warns(UserWarning, match="not used"):
        kernel = attncc.compile(SPEC, backend="numpy", seq=64, db=db)
    assert kernel.record is None and "does not fit" in kernel.selection


def test_a_corrupt_database_only_warns_and_keeps_its_bytes(tmp_path):
    db = tmp_path / "t.db"
    db.write_bytes(b"this is not sqlite" * 100)
    with pytest.warns(UserWarning, match="tuning database not used"):
        kernel = attncc.compile(SPEC, backend="numpy", db=db)
    assert kernel.record is None
    assert db.read_bytes() == b"this is not sqlite" * 100


def test_database_warnings_point_at_the_callers_line(tmp_path, monkeypatch):
    import numpy as np

    import attncc.db.lookup

    def fault(*args, **kwargs):
        raise attncc.errors.AttnccError("simulated read fault")

    monkeypatch.setattr(attncc.db.lookup, "find", fault)
    q = k = v = np.zeros((1, 4, 64, 16), dtype=np.float32)
    with pytest.warns(UserWarning, match="simulated read fault") as found:
        kernel = attncc.compile(SPEC, backend="numpy", seq=64, db=tmp_path / "t.db")  # at seq
        kernel(q, k[:, :, :32], v[:, :, :32])  # another bucket: looked up on the first call
    assert len(found) >= 2 and {w.filename for w in found} == {__file__}


def test_database_warnings_from_a_torch_module_point_at_the_callers_line(monkeypatch):
    import torch

    import attncc.db.lookup
    from attncc.integrations.modules import MultiheadAttention

    def fault(*args, **kwargs):
        raise attncc.errors.AttnccError("simulated read fault")

    monkeypatch.setattr(attncc.db.lookup, "find", fault)
    module = MultiheadAttention(64, 4)
    with pytest.warns(UserWarning, match="simulated read fault") as found:
        module(torch.zeros(1, 80, 64))  # a new bucket, looked up under torch's op dispatch
    assert found and {w.filename for w in found} == {__file__}


SHIPPED_WITHOUT_TUNE_EXTRA = r"""
import sys
sys.modules["optuna"] = None      # neither is importable: the tune extra is not installed
sys.modules["sqlalchemy"] = None
import attncc
kernel = attncc.compile(sys.argv[1], backend="numpy", seq=64)
print(kernel.record.origin if kernel.record else "no record", kernel.config)
"""


def test_shipped_records_are_used_without_optuna_or_sqlalchemy(tmp_path):
    spec = attncc.load_spec(SPEC)
    target = default_target()
    key = Key(spec.hash, "q64-k64", "float32", f"numpy@{registry.get('numpy').version}",
              target.key(3))
    record = Record(key, spec.name, {"block_m": 16, "block_n": 32}, 1e-3, 1e-5, 7,
                    target.to_dict(), {})
    (tmp_path / "cpu.jsonl").write_text(record.dumps() + "\n")
    env = {**os.environ, "ATTNCC_SHIPPED_DB": str(tmp_path)}
    env.pop("ATTNCC_DB", None)
    out = subprocess.run([sys.executable, "-c", SHIPPED_WITHOUT_TUNE_EXTRA, SPEC], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith(f"shipped {tmp_path / 'cpu.jsonl'}")
    assert "'block_m': 16, 'block_n': 32" in out
