"""Block-plan construction: attncc's interval classification against FlexAttention on CPU.

For causal, sliding-window (1024) and document (8 documents, sorted ids; the input-reading path)
masks at seq 8192, 32768 and 131072 with 128x128 blocks, times in one run:

- attncc ``build_plan`` (states) and the same plus all four index tables (FULL/PARTIAL per query
  block and their transposes), the fair comparison with a BlockMask; the plan cache is cleared
  before every call, so nothing is reused;
- torch ``create_block_mask(..., device="cpu", BLOCK_SIZE=128)`` eager (``_compile=False``) and
  compiled (``_compile=True``; its first call, which compiles, is reported apart).

Medians over repeats after a warm-up. A Flex cell whose time, extrapolated as N² from the previous
size, would pass ~60 s, or whose eager N² intermediates would pass half the free memory, is
skipped and says so. Writes bench/results/plan_cpu.md and plan_cpu.json.

    python bench/bench_plan.py [--seqs 8192 32768 131072] [--repeats 7]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np

import attncc
from attncc import plan as plan_module
from attncc.plan import build_plan

BLOCK = 128
WINDOW = 1024
DOCS = 8
LIMIT_S = 60.0
EAGER_BYTES_PER_PAIR = 10  # bool mask plus int64 temporaries of q - kv, per (q, kv) pair
RESULTS = Path(__file__).parent / "results"

SPECS = {
    "causal": {"attncc": 1, "name": "causal", "mask": "kv_idx <= q_idx"},
    "sliding_window": {"attncc": 1, "name": "sliding_window", "constants": {"window": WINDOW},
                       "mask": "kv_idx <= q_idx and q_idx - kv_idx < window"},
    "document": {"attncc": 1, "name": "document", "mask": "doc[b, q_idx] == doc[b, kv_idx]",
                 "inputs": {"doc": {"shape": ["batch", "seq_q"], "dtype": "int64"}}},
}


def document_ids(seq: int) -> np.ndarray:
    """(1, seq) sorted ids of DOCS documents with random boundaries (fixed seed)."""
    rng = np.random.default_rng(seq)
    cuts = np.sort(rng.choice(np.arange(1, seq), DOCS - 1, replace=False))
    return np.searchsorted(cuts, np.arange(seq), side="right")[None].astype(np.int64)


def median_time(fn, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def attncc_runs(name: str, seq: int, repeats: int) -> dict:
    spec = attncc.load_spec(SPECS[name])
    sizes = {"batch": 1, "heads": 1, "seq_q": seq, "seq_k": seq}
    inputs = {"doc": document_ids(seq)} if name == "document" else None

    def states():
        plan_module._cached_plan.cache_clear()
        return build_plan(spec, sizes, BLOCK, BLOCK, inputs)

    def with_tables():
        plan = states()
        for table in (plan.full_index, plan.partial_index, plan.full_index_t,
                      plan.partial_index_t):
            assert table.dtype == np.int32
        return plan

    plan = with_tables()
    t_states, _ = median_time(states, repeats)
    t_tables, runs = median_time(with_tables, repeats)
    return {"states_s": t_states, "tables_s": t_tables, "runs_s": runs, **plan.counts()}


def flex_mask_mod(name: str, seq: int):
    import torch

    if name == "causal":
        return lambda b, h, q, kv: q >= kv
    if name == "sliding_window":
        return lambda b, h, q, kv: (q >= kv) & (q - kv < WINDOW)
    doc = torch.from_numpy(document_ids(seq))
    return lambda b, h, q, kv: doc[b, q] == doc[b, kv]


def free_memory_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def flex_run(name: str, seq: int, compiled: bool, estimate: float | None, repeats: int) -> dict:
    from torch.nn.attention.flex_attention import create_block_mask

    if estimate is not None and estimate > LIMIT_S:
        return {"skipped": f"estimated {estimate:.0f} s (> {LIMIT_S:.0f} s) from the smaller size"}
    if not compiled and seq * seq * EAGER_BYTES_PER_PAIR > free_memory_bytes() / 2:
        need = seq * seq * EAGER_BYTES_PER_PAIR / 2**30
        return {"skipped": f"eager needs ~{need:.0f} GiB of N² temporaries (> half free memory)"}
    mask_mod = flex_mask_mod(name, seq)

    def run():
        return create_block_mask(mask_mod, 1, 1, seq, seq, device="cpu", BLOCK_SIZE=BLOCK,
                                 _compile=compiled)

    start = time.perf_counter()
    run()  # warm-up; for compiled, the compilation
    first = time.perf_counter() - start
    per_call = first if not compiled else None
    if per_call is None:
        start = time.perf_counter()
        run()
        per_call = time.perf_counter() - start
    reps = max(1, min(repeats, int(LIMIT_S / max(per_call, 1e-6)) - 1))
    t, runs = median_time(run, reps, warmup=0)
    return {"median_s": t, "runs_s": runs, "first_call_s": first}


def machine() -> dict:
    import torch

    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__,
            "numpy": np.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def fmt(seconds: float | None) -> str:
    if seconds is None:
        return "skipped"
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    for name in SPECS:
        previous = {False: None, True: None}
        for seq in args.seqs:
            row = {"mask": name, "seq": seq, "attncc": attncc_runs(name, seq, args.repeats)}
            for compiled in (False, True):
                last = previous[compiled]
                estimate = None if last is None else last[1] * (seq / last[0]) ** 2
                result = flex_run(name, seq, compiled, estimate, args.repeats)
                if "median_s" in result:
                    previous[compiled] = (seq, result["median_s"])
                else:
                    previous[compiled] = (seq, float("inf"))
                row["flex_compiled" if compiled else "flex_eager"] = result
            rows.append(row)
            print(line(row), flush=True)
    write(rows, machine())


def line(row: dict) -> str:
    a = row["attncc"]
    cells = [f"{row['mask']:<15} {row['seq']:>7}", f"attncc {fmt(a['states_s']):>10}",
             f"+tables {fmt(a['tables_s']):>10}"]
    for key in ("flex_eager", "flex_compiled"):
        r = row[key]
        t = r.get("median_s")
        ratio = f"x{t / a['tables_s']:.0f}" if t else ""
        cells.append(f"{key} {fmt(t):>10} {ratio}")
    return " | ".join(cells)


def write(rows: list, info: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "block": BLOCK, "window": WINDOW, "docs": DOCS, "rows": rows}
    (RESULTS / "plan_cpu.json").write_text(json.dumps(payload, indent=2) + "\n")
    out = [
        "# Block-plan construction on CPU: attncc vs FlexAttention `create_block_mask`",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}, numpy "
        f"{info['numpy']}, Python {info['python']}; {info['date']}.",
        f"Blocks {BLOCK}x{BLOCK}, batch 1, heads 1; sliding window {WINDOW}; document mask: "
        f"{DOCS} documents, sorted ids (attncc reads them through per-block min/max).",
        "Medians after warm-up. attncc: `build_plan` with its cache cleared (states), and the same "
        "plus all four index tables (FULL/PARTIAL and transposes), which is what a BlockMask "
        "holds; ratios are Flex time / attncc with tables. Flex compiled: `_compile=True`, warm "
        "(its first, compiling call in the last column).",
        "",
        "| mask | seq | attncc states | attncc + tables | Flex eager | ratio | Flex compiled "
        "| ratio | Flex compile (1st call) | FULL | PARTIAL | EMPTY |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        a, e, c = row["attncc"], row["flex_eager"], row["flex_compiled"]
        cells = [row["mask"], str(row["seq"]), fmt(a["states_s"]), fmt(a["tables_s"])]
        for r in (e, c):
            t = r.get("median_s")
            cells += [fmt(t), f"{t / a['tables_s']:.0f}x" if t else "-"]
        cells.append(fmt(c.get("first_call_s")) if "first_call_s" in c else "-")
        cells += [str(a["FULL"]), str(a["PARTIAL"]), str(a["EMPTY"])]
        out.append("| " + " | ".join(cells) + " |")
    skipped = [(row["mask"], row["seq"], key, row[key]["skipped"]) for row in rows
               for key in ("flex_eager", "flex_compiled") if "skipped" in row[key]]
    if skipped:
        out += ["", "Skipped Flex cells:", ""]
        out += [f"- {mask} {seq} {key}: {why}" for mask, seq, key, why in skipped]
    (RESULTS / "plan_cpu.md").write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
