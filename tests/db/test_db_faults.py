"""Faults: a damaged or locked SQLite file, a killed worker, a newer schema, an unreachable
server. Each is one clear DatabaseError and no record that was there before is lost."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from attncc.db.exchange import import_, parse
from attncc.db.key import DatabaseError, Key, Record
from attncc.db.store import Store
from attncc.tuning.study import open_study


def record(bucket="q64-k64") -> Record:
    key = Key("s1", bucket, "float32", "numpy@1", "cpu:Test/x86_64/v")
    return Record(key, "dense", {"block_m": 32}, 1e-3, 1e-4, 4, {"kind": "cpu", "device": "Test"},
                  {}, created="2026-01-01T00:00:00+00:00", updated="2026-01-01T00:00:00+00:00")


def test_file_that_is_not_sqlite_is_left_untouched_and_backed_up(tmp_path):
    path = tmp_path / "tuning.db"
    path.write_bytes(b"these are not the pages you are looking for" * 10)
    before = path.read_bytes()
    with pytest.raises(DatabaseError, match="is not a SQLite database; it was left untouched; "
                                            "a copy was saved at"):
        Store(path)
    assert path.read_bytes() == before
    backups = list(tmp_path.glob("tuning.db.unreadable-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == before


def test_truncated_file_is_one_error_and_never_rewritten(tmp_path):
    path = tmp_path / "tuning.db"
    with Store(path) as store:
        for n in range(40):
            store.put(record(f"q{2 ** n}-k1").with_(config={"pad": "x" * 400}))
    path.write_bytes(path.read_bytes()[:6000])
    before = path.read_bytes()
    with pytest.raises(DatabaseError, match=r"is damaged .*left untouched"):
        Store(path).records()
    assert path.read_bytes() == before
    assert list(tmp_path.glob("tuning.db.unreadable-*"))


def test_locked_database_says_so_and_keeps_records(tmp_path):
    path = tmp_path / "tuning.db"
    Store(path).put(record())
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(DatabaseError, match=r"is locked by another process \(waited 0.2 s"):
            Store(path, timeout=0.2).put(record("q128-k128"))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert Store(path).records() == [record()]


def test_newer_schema_is_refused_not_overwritten(tmp_path):
    path = tmp_path / "tuning.db"
    store = Store(path)
    store.put(record())
    body = {**record().to_json(), "schema": 99, "future_field": 1}
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE attncc_records SET body = ?, schema = 99", (json.dumps(body),))
    with pytest.raises(DatabaseError, match="record schema 99, this attncc reads up to schema 1"):
        store.get(record().key)
    with pytest.raises(DatabaseError, match="schema 99"):
        store.put(record())
    with sqlite3.connect(path) as conn:
        assert json.loads(conn.execute("SELECT body FROM attncc_records").fetchone()[0]) == body
        conn.execute("UPDATE attncc_meta SET value = '7' WHERE name = 'schema'")
    with pytest.raises(DatabaseError, match="has schema 7; this attncc reads up to schema 1"):
        Store(path)
    jsonl = tmp_path / "new.jsonl"
    jsonl.write_text(json.dumps(body) + "\n")
    with pytest.raises(DatabaseError, match=r"new\.jsonl:1: written by record schema 99"):
        import_(Store(tmp_path / "other.db"), jsonl)


def test_unreachable_postgres_is_one_line(monkeypatch):
    monkeypatch.setenv("ATTNCC_DB_CONNECT_TIMEOUT", "2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    with pytest.raises(DatabaseError) as err:
        Store(f"postgresql://attncc:secret@127.0.0.1:{port}/attncc")
    message = str(err.value)
    assert "\n" not in message and "secret" not in message
    assert ("is the server running" in message) or ("needs the psycopg driver" in message)


WORKER = """
import sys, time
import optuna
written = optuna.storages.RDBStorage.record_heartbeat
def record_heartbeat(self, trial_id):  # says when the trial's first heartbeat is in the file
    written(self, trial_id)
    print("heartbeat", flush=True)
optuna.storages.RDBStorage.record_heartbeat = record_heartbeat
from attncc.tuning.study import open_study
study = open_study(sys.argv[1], "killed", budget=3, heartbeat=1)
def objective(trial):
    trial.suggest_categorical("block_m", [16, 32])
    print("running", flush=True)
    time.sleep(120)
    return 1.0
study.optimize(objective, n_trials=1)
"""


def test_killed_worker_trial_is_failed_on_next_open(tmp_path):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    worker = subprocess.Popen([sys.executable, "-c", WORKER, url], stdout=subprocess.PIPE,
                              text=True)
    try:
        # a trial that never wrote a heartbeat is never stale: kill only once one is written,
        # however long a loaded machine takes to write it
        seen = set()
        while seen != {"running", "heartbeat"}:
            line = worker.stdout.readline()
            assert line, f"the worker ended early, after {seen}"
            seen.add(line.strip())
    finally:
        worker.kill()
        worker.wait()
    trials = optuna.load_study(study_name="killed", storage=url).get_trials()
    assert [t.state for t in trials] == [TrialState.RUNNING]  # the kill left it dangling
    # past the grace period (2 heartbeats of 1 s): SQLite's clock counts whole seconds, so
    # only 3 s after the last heartbeat is the difference it sees surely more than 2
    time.sleep(3.5)
    study = open_study(url, "killed", budget=3, heartbeat=1)
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL]


def test_one_unreadable_row_does_not_hide_the_others(tmp_path):
    path = tmp_path / "tuning.db"
    store = Store(path)
    good = record()
    store.put(good)
    other = record(bucket="q128-k128")
    store.put(other)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE attncc_records SET body = '{\"schema\": 2}' WHERE id = ?",
                     (other.id,))
    with pytest.warns(UserWarning, match="1 unreadable record"):
        assert Store(path).records() == [good]


def test_imported_records_with_impossible_times_or_deep_json_are_refused(tmp_path):
    bad = {**record().to_json(), "median_s": -1.0}
    with pytest.raises(DatabaseError, match="'median_s' a finite number >= 0"):
        parse(json.dumps(bad), "x.jsonl")
    with pytest.raises(DatabaseError, match="nested too deeply"):
        parse("[" * 100000, "x.jsonl")
