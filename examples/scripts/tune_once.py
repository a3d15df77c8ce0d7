"""Tune a spec on this machine once; a second process then compiles it with no benchmarking.

    python examples/scripts/tune_once.py [--spec examples/causal.yaml] [--seq 256] [--trials 6]

Process 1 runs ``attncc.tune`` (Optuna over the torch backend's tile parameters) and stores the
winner in a tuning database keyed by this machine's fingerprint. Process 2 (a fresh interpreter)
compiles the same spec: the record is found in the database and ``time_call`` never runs. The
database is a temporary SQLite file (``--db`` to keep one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent

SECOND = r"""
import json, sys, time
start = time.perf_counter()
import attncc.api, attncc.tuning.measure as measure
from attncc.db.lookup import lookup
spec, db, seq = sys.argv[1], sys.argv[2], int(sys.argv[3])
record = lookup(spec, "torch", sizes=seq, db=db)
if record is None:
    sys.exit("no tuned record found for this machine")
kernel = attncc.api.compile(spec, backend="torch")
found_by_compile = kernel.config == {**kernel.config, **record.config}
if not found_by_compile:  # a compile that does not consult the database yet: pass the record
    kernel = attncc.api.compile(spec, backend="torch", config=record.config)
import torch
q = torch.randn(1, 4, seq, 32)
kernel(q, q, q)
print(json.dumps({"config": kernel.config, "benchmarks": measure.measurements(),
                  "found_by_compile": found_by_compile, "origin": record.origin,
                  "note": record.note, "seconds": time.perf_counter() - start}, default=str))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(EXAMPLES / "causal.yaml"))
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--db", default=None, help="SQLite path or database URL")
    args = parser.parse_args(argv)
    db = args.db or str(Path(tempfile.mkdtemp(prefix="attncc_tune_")) / "tuning.db")

    import attncc

    start = time.perf_counter()
    record = attncc.tune(args.spec, backend="torch", batch=1, seq=args.seq,
                         trials=args.trials, db=db, seed=0, progress=False)
    print(f"process 1: tuned {record.spec_name} in {time.perf_counter() - start:.1f}s over "
          f"{record.trials} trials -> {record.config} ({record.median_s * 1e3:.2f} ms)")
    env = {**os.environ, "ATTNCC_DB": db}  # the database attncc.compile would consult
    result = subprocess.run([sys.executable, "-c", SECOND, args.spec, db, str(args.seq)],  # noqa: S603
                            capture_output=True, text=True, check=False, env=env)
    if result.returncode:
        print(f"process 2 failed: {result.stderr.strip()}", file=sys.stderr)
        return 1
    second = json.loads(result.stdout.strip().splitlines()[-1])
    how = ("attncc.compile chose the tuned config by itself" if second["found_by_compile"]
           else "looked up with attncc.db.lookup.lookup and passed to compile")
    print(f"process 2: {how}; config {second['config']}; benchmarks run: "
          f"{second['benchmarks']}; {second['seconds']:.1f}s including imports")
    ok = second["benchmarks"] == 0 and all(second["config"][k] == v
                                           for k, v in record.config.items())
    print("second process paid no tuning" if ok else "second process did not get the record")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
