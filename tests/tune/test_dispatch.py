"""Per-shape dispatch (attncc.tuning.dispatch): a record per shape bucket and dtype, looked up on
first sight; hints from fallback target layers checked against the default config (fake timings,
never real ones); the integrations get one config per bucket."""

from __future__ import annotations

import numpy as np
import pytest

import attncc
from attncc.backends import registry
from attncc.db import lookup as lookups
from attncc.db.key import Key, Record
from attncc.db.store import Store
from attncc.target import Target, default_target
from attncc.tuning import measure
from attncc.tuning.measure import Timing

SPEC = "examples/sliding_window.yaml"


def _record(db, bucket, config, *, target=None, backend="numpy"):
    spec, target = attncc.load_spec(SPEC), target or default_target()
    chosen = registry.get(backend)
    key = Key(spec.hash, bucket, "float32", f"{chosen.name}@{chosen.version}", target.key(3))
    record = Record(key, spec.name, config, 1e-3, 1e-5, 7, target.to_dict(), {})
    Store(db).put(record)
    return record


def _elsewhere() -> Target:
    """This machine's device and architecture with other package versions (a fallback layer)."""
    data = default_target().to_dict()
    data["versions"] = {**data["versions"], "numpy": "0.0.1"}
    return Target.from_dict(data)


def _q(seq, dtype=np.float32):
    return np.random.default_rng(seq).standard_normal((1, 2, seq, 16)).astype(dtype)


def test_each_bucket_gets_its_own_record_looked_up_once(tmp_path, monkeypatch):
    db = tmp_path / "t.db"
    long = _record(db, "q64-k64", {"block_m": 32, "block_n": 16})
    short = _record(db, "q16-k16", {"block_m": 16, "block_n": 16})
    kernel = attncc.compile(SPEC, backend="numpy", db=db)
    assert kernel.record is None and "each bucket is looked up" in kernel.selection
    finds = []
    real = lookups.find
    monkeypatch.setattr(lookups, "find", lambda *a, **kw: finds.append(a) or real(*a, **kw))
    for seq in (64, 16, 64, 60, 16):
        q = _q(seq)
        out = kernel(q, q, q)
        assert np.abs(out - attncc.reference(SPEC, q, q, q)).max() < 1e-5
    assert len(finds) == 2  # one lookup per bucket; 60 shares q64-k64's variant
    assert kernel.records == {("q64-k64", "float32"): long, ("q16-k16", "float32"): short}
    assert kernel.last_plan is not None  # other attributes: the variant that ran last
    assert long.id in kernel.selection and short.id in kernel.selection
    q = _q(16, np.float64)  # another dtype: its own lookup (a miss) and variant
    kernel(q, q, q)
    assert kernel.records[("q16-k16", "float64")] is None


def test_seq_selects_the_primary_bucket_and_a_pinned_config_serves_every_shape(tmp_path):
    db = tmp_path / "t.db"
    record = _record(db, "q64-k64", {"block_m": 32, "block_n": 16})
    kernel = attncc.compile(SPEC, backend="numpy", seq=64, db=db)
    assert kernel.record == record and kernel.config["block_m"] == 32
    pinned = attncc.compile(SPEC, backend="numpy", config={"block_m": 16}, db=db)
    assert pinned.records == {} and "for every shape" in pinned.selection
    assert type(pinned).__name__ != "Dispatch"


@pytest.mark.parametrize("hint_ms,kept", [(0.5, True), (2.0, False)])
def test_a_fallback_record_is_checked_against_the_default_once(tmp_path, monkeypatch,
                                                                hint_ms, kept):
    db = tmp_path / "t.db"
    hint = _record(db, "q64-k64", {"block_m": 32, "block_n": 16}, target=_elsewhere())
    timed = []

    def fake_timings(first, second, call, sync):  # the hint takes hint_ms, the default 1 ms
        timed.append((first.config["block_m"], second and second.config["block_m"]))
        return Timing(hint_ms * 1e-3, 0.0, ()), Timing(1e-3, 0.0, ())

    monkeypatch.setattr(measure, "time_call", None)  # no real timing
    monkeypatch.setattr("attncc.tuning.verify._interleaved", fake_timings)
    kernel = attncc.compile(SPEC, backend="numpy", seq=64, db=db)
    assert kernel.record is None and "until the first call" in kernel.selection  # not blindly
    assert not timed
    q = _q(64)
    out = kernel(q, q, q)
    assert np.abs(out - attncc.reference(SPEC, q, q, q)).max() < 1e-5
    verdict = kernel.records[("q64-k64", "float32")]
    assert verdict.verified and hint.id in verdict.verified and len(timed) == 1
    assert (verdict.config["block_m"] == 32) == kept
    assert verdict.key.target == default_target().key(3)
    kernel(q, q, q)
    assert len(timed) == 1  # checked once
    again = attncc.compile(SPEC, backend="numpy", seq=64, db=db)  # stored: exact, untimed
    assert again.record == verdict and "verified here" in again.selection and len(timed) == 1


def test_integrations_dispatch_prefill_and_decode_separately(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from attncc.integrations.ops import op

    db = tmp_path / "t.db"
    monkeypatch.setenv("ATTNCC_DB", str(db))
    spec = {"attncc": 1, "name": "causal_dispatch", "mask": "kv_idx <= q_idx"}
    fn = op(spec, backend="torch")
    for seq_q, seq_k in ((32, 32), (1, 32)):
        q = torch.randn(1, 2, seq_q, 8)
        k = torch.randn(1, 2, seq_k, 8)
        fn(q, k, k)
    assert set(fn.kernel.records) == {("q32-k32", "float32"), ("q1-k32", "float32")}
