"""Many local processes on one SQLite file: four `attncc tune` started at once on a fresh file,
and concurrent imports and lookups, all finish and keep every record."""

from __future__ import annotations

import os
import subprocess
import sys

from attncc.db.exchange import export
from attncc.db.key import Key, Record
from attncc.db.store import Store
from attncc.target import default_target

SPEC = "examples/causal.yaml"


def _env(tmp_path):
    env = {**os.environ, "ATTNCC_SHIPPED_DB": str(tmp_path / "none"), "OMP_NUM_THREADS": "1"}
    env.pop("ATTNCC_DB", None)
    return env


def test_four_tuners_at_once_on_a_fresh_file_all_finish(tmp_path):
    db = tmp_path / "fresh.db"
    procs = [subprocess.Popen(["attncc", "tune", SPEC, "--backend", "numpy", "--seq", str(seq),
                               "--trials", "2", "--db", str(db), "--quiet", "--seed", "0"],
                              env=_env(tmp_path), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for seq in (8, 16, 32, 16)]  # two of them share one key (and one study)
    # communicate, not wait: a child blocked on a full stdout/stderr pipe would never exit
    results = [(*p.communicate(timeout=600), p.returncode) for p in procs]
    assert all(code == 0 for _, _, code in results), results
    buckets = sorted(r.key.bucket for r in Store(db).records())
    assert buckets == ["q16-k16", "q32-k32", "q8-k8"]


IMPORT_AND_LOOK_UP = r"""
import sys
from attncc.db.exchange import import_
from attncc.db.store import Store
store = Store(sys.argv[1])
for _ in range(5):
    import_(store, sys.argv[2])
    assert len(store.records()) >= 20
"""


def test_concurrent_imports_and_lookups_keep_every_record(tmp_path):
    target = default_target()
    source = Store(tmp_path / "source.db")
    for n in range(20):
        key = Key(f"{n:016x}", "q64-k64", "float32", "numpy@1", target.key(3))
        source.put(Record(key, f"s{n}", {"block_m": 16}, 1e-3, 0.0, 1, target.to_dict(), {}))
    export(source, tmp_path / "records.jsonl")
    db = tmp_path / "shared.db"
    procs = [subprocess.Popen([sys.executable, "-c", IMPORT_AND_LOOK_UP, str(db),
                               str(tmp_path / "records.jsonl")], env=_env(tmp_path),
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [(p.communicate(timeout=300)[1], p.returncode) for p in procs]
    assert all(code == 0 for _, code in results), results
    assert sorted(r.id for r in Store(db).records()) == sorted(r.id for r in source.records())
