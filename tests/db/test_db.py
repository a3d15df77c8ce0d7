"""The tuning database: keys, the SQLite store, JSONL exchange, lookup order, the db CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from attncc.cli.db import db as db_cli
from attncc.db.exchange import export, import_, read
from attncc.db.key import DatabaseError, Key, Record, bucket_of, upper_bound
from attncc.db.lookup import find, lookup
from attncc.db.store import Store, resolve, study_storage
from attncc.errors import InputError
from attncc.target import Target

HERE = Target(kind="cpu", device="Test CPU", cores=8, arch="x86_64", isa=("avx2",),
              versions=(("attncc", "0.1.0"), ("numpy", "2.0")))
NEWER = Target(kind="cpu", device="Test CPU", cores=8, arch="x86_64", isa=("avx2",),
               versions=(("attncc", "0.1.0"), ("numpy", "2.5")))
OTHER_ISA = Target(kind="cpu", device="Test CPU", cores=8, arch="x86_64", isa=("avx512f",))
ELSEWHERE = Target(kind="cpu", device="Other CPU", cores=4, arch="x86_64")


def record(target: Target = HERE, *, spec_hash="s1", bucket="q64-k64", config=None,
           median=1e-3, updated="2026-01-01T00:00:00+00:00") -> Record:
    key = Key(spec_hash, bucket, "float32", "numpy@1", target.key(3))
    return Record(key, "dense", config or {"block_m": 32, "block_n": 64}, median, median / 10, 5,
                  target.to_dict(), {"numpy": "2.0"}, created=updated, updated=updated)


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "tuning.db") as s:
        yield s


def test_bucket_rounds_each_length_up_to_a_power_of_two():
    assert bucket_of(1000) == "q1024-k1024"
    assert bucket_of(1024) == "q1024-k1024"
    assert bucket_of(1025) == "q2048-k2048"
    assert bucket_of(1, 3000) == "q1-k4096"
    with pytest.raises(Exception, match="seq_q a positive int"):
        bucket_of(0)


@pytest.mark.parametrize("bad", ["q1024", "q1000-k1024", "x1-k2", "q1-k4096 ", "", None])
def test_a_malformed_bucket_is_one_input_error(bad):
    assert upper_bound("q1-k4096") == (1, 4096)
    with pytest.raises(InputError, match="expected 'q<Q>-k<K>' with Q and K powers of two"):
        upper_bound(bad)
    if bad is not None:
        with pytest.raises(InputError, match="shape bucket"):
            lookup("examples/causal.yaml", "numpy", bad)


def test_resolve_paths_urls_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNCC_DB", str(tmp_path / "env.db"))
    assert resolve(None) == f"sqlite:///{tmp_path / 'env.db'}"
    assert resolve(tmp_path / "x.db") == f"sqlite:///{tmp_path / 'x.db'}"
    assert resolve("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert study_storage(resolve(tmp_path / "x.db")) == f"sqlite:///{tmp_path / 'x.optuna.db'}"
    monkeypatch.delenv("ATTNCC_DB")
    assert resolve(None).endswith("/.cache/attncc/tuning.db")


def test_put_get_and_replace_keeps_created(store):
    first = record(updated="2026-01-01T00:00:00+00:00")
    store.put(first)
    assert store.get(first.key) == first
    better = record(config={"block_m": 64, "block_n": 64}, median=5e-4,
                    updated="2026-02-01T00:00:00+00:00").with_(created="2026-02-01T00:00:00+00:00")
    stored = store.put(better)
    assert stored.created == first.created
    assert store.get(first.key).config == {"block_m": 64, "block_n": 64}
    assert len(store.records()) == 1
    store.put(record(bucket="q128-k128"))
    assert [r.key.bucket for r in store.records(bucket="q128-k128")] == ["q128-k128"]
    assert len(store.records(backend="numpy")) == 2
    assert store.records(backend="torch") == []


def test_jsonl_export_import_round_trips_exactly(store, tmp_path):
    originals = [record(bucket=f"q{n}-k{n}", median=n * 1e-6) for n in (64, 128, 256)]
    for r in originals:
        store.put(r)
    first = tmp_path / "a.jsonl"
    assert export(store, first) == 3
    other = Store(tmp_path / "other.db")
    assert import_(other, first) == (3, 0)
    second = tmp_path / "b.jsonl"
    export(other, second)
    assert first.read_bytes() == second.read_bytes()
    assert sorted(read(second), key=lambda r: r.id) == sorted(originals, key=lambda r: r.id)
    assert import_(other, first, replace=False) == (0, 3)


def test_jsonl_errors_name_file_and_line(store, tmp_path):
    good = record().dumps()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good + "\n{not json\n")
    with pytest.raises(DatabaseError, match=r"bad\.jsonl:2: expected one JSON object"):
        import_(store, bad)
    assert store.records() == []  # validated before anything is written
    bad.write_text(good + "\n" + good + "\n")
    with pytest.raises(DatabaseError, match=r"bad\.jsonl:2: duplicate record"):
        read(bad)
    data = json.loads(good)
    data["trials"] = "five"
    bad.write_text(json.dumps(data))
    with pytest.raises(DatabaseError, match="expected 'trials' of type int"):
        read(bad)


def test_lookup_exact_then_nearest_layer_user_before_shipped(store, tmp_path, monkeypatch):
    shipped_dir = tmp_path / "shipped"
    shipped_dir.mkdir()
    monkeypatch.setenv("ATTNCC_SHIPPED_DB", str(shipped_dir))
    from attncc.db import exchange

    exchange.reread_shipped()
    key = record().key
    assert find(store, key, HERE) is None
    # A shipped record for this exact target beats a user record from other versions.
    (shipped_dir / "cpu.jsonl").write_text(record(config={"block_m": 16, "block_n": 16}).dumps()
                                           + "\n")
    exchange.reread_shipped()
    store.put(record(NEWER, config={"block_m": 128, "block_n": 128}))
    hit = find(store, key, HERE)
    assert hit.config == {"block_m": 16, "block_n": 16}
    assert hit.origin.startswith("shipped") and "exact match" in hit.note
    # At equal match quality the user's database wins.
    store.put(record(HERE, config={"block_m": 64, "block_n": 32}))
    hit = find(store, key, HERE)
    assert hit.config == {"block_m": 64, "block_n": 32} and hit.origin.startswith("database")
    # On a machine with other versions: the nearest layer, and the note says so.
    elsewhere_versions = Target(kind="cpu", device="Test CPU", cores=8, arch="x86_64",
                                isa=("avx2",), versions=(("numpy", "3.0"),))
    hit = find(store, key, elsewhere_versions)
    assert "no exact match" in hit.note and "numpy" in hit.note
    assert find(store, key, OTHER_ISA).note.startswith("no exact match; using a record from the "
                                                       "same device model")
    assert find(store, key, ELSEWHERE) is None
    assert find(store, Key("s1", "q128-k128", "float32", "numpy@1", ""), HERE) is None
    assert find(store, Key("s1", "", "float32", "numpy@1", ""), HERE, any_bucket=True) is not None
    exchange.reread_shipped()


def test_db_cli_list_show_export_import_clear(store, tmp_path):
    store.put(record())
    store.put(record(bucket="q128-k128"))
    runner = CliRunner()
    db = str(store.path)
    out = runner.invoke(db_cli, ["list", "--db", db])
    assert out.exit_code == 0 and out.output.count("dense") == 2
    rid = record().id
    out = runner.invoke(db_cli, ["show", "--db", db, rid[:6]])
    assert out.exit_code == 0 and json.loads(out.output)["bucket"] == "q64-k64"
    out = runner.invoke(db_cli, ["show", "--db", db, "zzzz"])
    assert out.exit_code != 0 and "expected exactly one match, got 0" in str(out.exception)
    path = tmp_path / "out.jsonl"
    assert runner.invoke(db_cli, ["export", "--db", db, str(path)]).exit_code == 0
    assert len(path.read_text().splitlines()) == 2
    out = runner.invoke(db_cli, ["clear", "--db", db, "--yes", "--spec", "s1"])
    assert out.exit_code == 0 and "deleted 2" in out.output
    assert store.records() == []
    out = runner.invoke(db_cli, ["import", "--db", db, str(path)])
    assert out.exit_code == 0 and "imported 2" in out.output
    out = runner.invoke(db_cli, ["clear", "--db", db], input="n\n")
    assert out.exit_code != 0 and len(store.records()) == 2


# -- where the shipped records are found -----------------------------------------------------
REPO = Path(__file__).resolve().parents[2]


def test_shipped_folder_order_checkout_then_installed_copy(tmp_path, monkeypatch):
    from attncc.db.exchange import first_shipped_dir, shipped_dir

    checkout, package = tmp_path / "checkout", tmp_path / "site" / "attncc"
    (package / "tuning_db").mkdir(parents=True)
    (checkout / "tuning_db").mkdir(parents=True)
    # a folder beside the package is a checkout only with its pyproject.toml
    assert first_shipped_dir(checkout, package) == package / "tuning_db"
    (checkout / "pyproject.toml").write_text("")
    assert first_shipped_dir(checkout, package) == checkout / "tuning_db"
    assert first_shipped_dir(tmp_path / "site", package) == package / "tuning_db"
    assert first_shipped_dir(tmp_path / "site", None) == tmp_path / "site" / "tuning_db"
    monkeypatch.setenv("ATTNCC_SHIPPED_DB", str(tmp_path / "mine"))
    assert shipped_dir() == tmp_path / "mine"
    monkeypatch.delenv("ATTNCC_SHIPPED_DB")
    assert shipped_dir() == REPO / "tuning_db"  # this test runs from the checkout


def test_an_installed_copy_is_read_when_no_checkout_is_around(tmp_path, monkeypatch):
    from attncc.db import exchange

    package = tmp_path / "attncc"
    (package / "tuning_db").mkdir(parents=True)
    (package / "tuning_db" / "cpu.jsonl").write_text(record().dumps() + "\n")
    monkeypatch.delenv("ATTNCC_SHIPPED_DB", raising=False)
    monkeypatch.setattr(exchange, "__file__", str(package / "db" / "exchange.py"))
    monkeypatch.setattr(exchange, "_package_root", lambda: package)
    exchange.reread_shipped()
    try:
        assert [r.id for _, r in exchange.shipped()] == [record().id]
    finally:
        exchange.reread_shipped()


def test_a_built_wheel_carries_the_shipped_records(tmp_path):
    """Build a real wheel from a copy of the packaging files (about two seconds)."""
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    source = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "*.pyc")
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        source.mkdir(exist_ok=True)
        shutil.copy(REPO / name, source / name)
    for name in ("attncc", "plugins", "tuning_db"):
        shutil.copytree(REPO / name, source / name, ignore=skip)
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "--no-index", "-q", "-w", str(tmp_path / "dist"), str(source)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("attncc-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = sorted(p.name for p in (REPO / "tuning_db").glob("*.jsonl"))
    assert shipped, "the repository ships no tuning records"
    assert {f"attncc/tuning_db/{n}" for n in shipped} <= names
    assert not any(n.startswith("tuning_db/") for n in names)
