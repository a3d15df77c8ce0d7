"""NumPy backend: time vs mask density at seq 2048, 8 heads, head_dim 64, float32, batch 1.

Runs dense attention, causal sliding windows of several widths and document masks with several
document counts, and reports for each the block density (from the block plan), the median time
after warm-up, and time / dense time next to density / dense density. The tiled kernel visits only
non-EMPTY blocks, so the time ratio should follow the density ratio.

    python bench/bench_numpy_density.py [--reps 5] [--block-m 64 --block-n 128] [-o bench/results]

Writes ``numpy_density_cpu.md`` and ``numpy_density_cpu.json`` to the output folder.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

import attncc
from attncc.passes.pipeline import lower
from attncc_numpy import NumpyBackend

SEQ, HEADS, HEAD_DIM, BATCH = 2048, 8, 64, 1
WINDOWS = (64, 128, 256, 512, 1024)
DOC_COUNTS = (2, 4, 8, 16, 32)


def cases():
    """(label, spec dict, inputs) for every measured mask."""
    yield "dense", {"attncc": 1, "name": "dense"}, {}
    for w in WINDOWS:
        yield (f"sliding window {w}", {"attncc": 1, "name": f"window_{w}",
                                       "mask": "kv_idx <= q_idx and q_idx - kv_idx < window",
                                       "constants": {"window": w}}, {})
    for n in DOC_COUNTS:
        doc = np.repeat(np.arange(n, dtype=np.int32), SEQ // n)[None]
        yield (f"documents x{n}", {"attncc": 1, "name": f"docs_{n}",
                                   "mask": "doc[b, q_idx] == doc[b, kv_idx]",
                                   "inputs": {"doc": {"shape": ["batch", "seq_q"],
                                                      "dtype": "int32"}}}, {"doc": doc})


def machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "logical_cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg()),
            "python": platform.python_version(), "numpy": np.__version__,
            "attncc": attncc.__version__, "platform": platform.platform()}


def run(reps: int, config: dict) -> list[dict]:
    """Time every case ``reps`` times, round-robin (one run of each case per round), so that
    load from other processes spreads over all cases alike; medians per case."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((BATCH, HEADS, SEQ, HEAD_DIM), dtype=np.float32)
    k = rng.standard_normal((BATCH, HEADS, SEQ, HEAD_DIM), dtype=np.float32)
    v = rng.standard_normal((BATCH, HEADS, SEQ, HEAD_DIM), dtype=np.float32)
    backend = NumpyBackend()
    calls = []
    for label, spec_dict, inputs in cases():
        kernel = backend.compile(lower(attncc.load_spec(spec_dict)), config, None)
        kernel(q, k, v, **inputs)  # warm-up (and the plan)
        calls.append((label, kernel, inputs))
    times = {label: [] for label, _, _ in calls}
    for _ in range(reps):
        for label, kernel, inputs in calls:
            start = time.perf_counter()
            kernel(q, k, v, **inputs)
            times[label].append(time.perf_counter() - start)
    rows = []
    for label, kernel, _ in calls:
        t = times[label]
        rows.append({"mask": label, "density": kernel.last_plan.block_density(),
                     "time_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
                     "tiles": kernel.last_stats.tiles, "full": kernel.last_stats.full,
                     "partial": kernel.last_stats.partial})
        print(f"{label:<20} density {rows[-1]['density']:.3f}  median "
              f"{rows[-1]['time_s'] * 1e3:8.1f} ms (min {min(t) * 1e3:.1f}, max "
              f"{max(t) * 1e3:.1f})", flush=True)
    dense = rows[0]
    for row in rows:
        row["time_ratio"] = row["time_s"] / dense["time_s"]
        row["min_ratio"] = row["min_s"] / dense["min_s"]
        row["density_ratio"] = row["density"] / dense["density"]
    return rows


def report(rows: list[dict], info: dict, config: dict, reps: int) -> str:
    lines = ["# NumPy backend: time vs mask density (CPU)", "",
             f"Date: {info['date']}. Machine: {info['cpu']}, {info['logical_cores']} logical "
             f"cores ({info['usable_cores']} usable). Python {info['python']}, NumPy "
             f"{info['numpy']}, attncc {info['attncc']}.", "",
             f"Shape: batch {BATCH}, {HEADS} heads, seq {SEQ}, head_dim {HEAD_DIM}, float32. "
             f"Tiles: block_m {config['block_m']}, block_n {config['block_n']}. Median of "
             f"{reps} runs after one warm-up, taken round-robin over the masks. Density is the "
             "block plan's area fraction of non-EMPTY blocks; time ratio is time / dense time. "
             f"Load average at the start: {info['load_average']} (other processes shared the "
             "cores; the round-robin order spreads their load over all masks alike).", "",
             "| mask | density | tiles (full + partial) | median (ms) | time ratio | "
             "time ratio / density | min (ms) | min ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mask']} | {r['density']:.3f} | {r['tiles']} ({r['full']} + "
                     f"{r['partial']}) | {r['time_s'] * 1e3:.1f} | {r['time_ratio']:.3f} | "
                     f"{r['time_ratio'] / r['density_ratio']:.2f} | {r['min_s'] * 1e3:.1f} | "
                     f"{r['min_ratio']:.3f} |")
    sparse = [r for r in rows if r["density"] < 0.5]
    density = [r["density"] for r in rows]
    fit = np.polyfit(density, [r["time_ratio"] for r in rows], 1)
    fit_min = np.polyfit(density, [r["min_ratio"] for r in rows], 1)
    lines += ["", f"Least-squares fit over all masks: median time ratio = {fit[0]:.2f} x density "
                  f"+ {fit[1]:.3f}; min time ratio = {fit_min[0]:.2f} x density + "
                  f"{fit_min[1]:.3f} (exactly proportional would be 1.00 x density + 0). "
                  "Masks below density 0.5 run at "
                  f"{min(r['time_ratio'] / r['density_ratio'] for r in sparse):.2f}-"
                  f"{max(r['time_ratio'] / r['density_ratio'] for r in sparse):.2f} x "
                  "their density's share of the dense time (1.00 = exactly proportional); PARTIAL "
                  "blocks also pay for the mask, FULL blocks do not."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--block-m", type=int, default=64)
    parser.add_argument("--block-n", type=int, default=128)
    parser.add_argument("-o", "--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    config = {"block_m": args.block_m, "block_n": args.block_n}
    info = {**machine(), "date": datetime.date.today().isoformat()}
    rows = run(args.reps, config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "numpy_density_cpu.json").write_text(json.dumps(
        {"machine": info, "shape": {"batch": BATCH, "heads": HEADS, "seq": SEQ,
                                    "head_dim": HEAD_DIM, "dtype": "float32"},
         "config": config, "reps": args.reps, "rows": rows}, indent=2) + "\n")
    text = report(rows, info, config, args.reps)
    (out / "numpy_density_cpu.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
