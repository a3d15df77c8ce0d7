"""attncc's torch backend against torch SDPA and compiled FlexAttention on CPU, side by side.

float32, batch 1, 8 heads, head_dim 64; median of repeated runs after warm-up, attncc, SDPA and
Flex interleaved within each repetition. Variants: dense,
causal, sliding window 256, document mask (4 documents), Longformer, BigBird. Also: the first call
in a fresh process (attncc compile + call vs FlexAttention's torch.compile + call), and the peak
resident memory of forward + backward as the sequence grows to 16384 (the flash backward
recomputes tiles, so memory grows with N, not N²).

    python bench/bench_torch_cpu.py [--seqs 2048 8192] [--reps 5] [--out bench/results/torch_cpu]

Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812 - the name torch code uses

import attncc
from attncc.passes.pipeline import lower
from attncc_torch import TorchBackend

HEADS, DIM = 8, 64
WINDOW, DOCS, N_GLOBAL, LF_WINDOW, BB_BLOCK, BB_RANDOM = 256, 4, 64, 128, 64, 3

SPECS = {
    "dense": {"mask": None},
    "causal": {"mask": "kv_idx <= q_idx"},
    "sliding_window": {"mask": f"kv_idx <= q_idx and q_idx - kv_idx < {WINDOW}"},
    "document_mask": {"mask": "doc[b, q_idx] == doc[b, kv_idx]",
                      "inputs": {"doc": {"shape": ["batch", "seq_q"], "dtype": "int32"}}},
    "longformer": {"mask": f"abs(q_idx - kv_idx) <= {LF_WINDOW} or q_idx < {N_GLOBAL} "
                           f"or kv_idx < {N_GLOBAL}"},
    "bigbird": {"mask": f"abs(q_idx - kv_idx) <= {LF_WINDOW} or q_idx < {N_GLOBAL} or kv_idx < "
                        f"{N_GLOBAL} or rand_blocks[q_idx // {BB_BLOCK}, kv_idx // {BB_BLOCK}]",
                "inputs": {"rand_blocks": {"shape": [f"seq_q // {BB_BLOCK}",
                                                     f"seq_k // {BB_BLOCK}"], "dtype": "bool"}}},
}


def spec_of(name: str):
    body = {k: v for k, v in SPECS[name].items() if v is not None}
    return attncc.load_spec({"attncc": 1, "name": f"bench_{name}", **body})


def inputs_of(name: str, n: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    if name == "document_mask":
        cuts = torch.sort(torch.randperm(n - 1, generator=gen)[:DOCS - 1] + 1).values
        doc = torch.zeros(n, dtype=torch.int32)
        for c in cuts:
            doc[c:] += 1
        return {"doc": doc[None]}
    if name == "bigbird":
        nb = n // BB_BLOCK
        picks = torch.rand(nb, nb, generator=gen).argsort(-1)[:, :BB_RANDOM]
        blocks = torch.zeros(nb, nb, dtype=torch.bool)
        blocks.scatter_(1, picks, True)
        return {"rand_blocks": blocks}
    return {}


def mask_mod_of(name: str, ins: dict):
    if name == "dense":
        return None
    if name == "causal":
        return lambda b, h, q, kv: kv <= q
    if name == "sliding_window":
        return lambda b, h, q, kv: (kv <= q) & (q - kv < WINDOW)
    if name == "document_mask":
        doc = ins["doc"]
        return lambda b, h, q, kv: doc[b, q] == doc[b, kv]
    lf = lambda b, h, q, kv: ((q - kv).abs() <= LF_WINDOW) | (q < N_GLOBAL) | (kv < N_GLOBAL)  # noqa: E731
    if name == "longformer":
        return lf
    rb = ins["rand_blocks"]
    return lambda b, h, q, kv: lf(b, h, q, kv) | rb[q // BB_BLOCK, kv // BB_BLOCK]


def median_times(fns: list, reps: int, warmup: int = 2) -> list[float]:
    """Median seconds of each function, the functions interleaved within every repetition (so a
    burst of load from other processes hits all of them alike)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def density(name: str, n: int, ins: dict) -> float:
    mod = mask_mod_of(name, ins)
    if mod is None:
        return 1.0
    idx = torch.arange(n)
    kept = sum(int(mod(0, 0, idx[i:i + 512, None], idx[None]).sum()) for i in range(0, n, 512))
    return kept / (n * n)


def attncc_kernel(name: str, config: dict | None = None):
    spec = spec_of(name)
    backend = TorchBackend()
    graph = lower(spec)
    return backend.compile(graph, {**backend.default_config(graph, None), **(config or {})}, None)


def bench_row(name: str, n: int, reps: int, flex_cache: dict) -> dict:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, HEADS, n, DIM, generator=gen) for _ in range(3))
    ins = inputs_of(name, n)
    kernel = attncc_kernel(name)
    row = {"variant": name, "seq": n, "density": density(name, n, ins)}
    if "flex" not in flex_cache:
        flex_cache["flex"] = torch.compile(flex_attention, dynamic=False)
    mod = mask_mod_of(name, ins)
    bm = create_block_mask(mod, 1, None, n, n, device="cpu") if mod else None
    with torch.no_grad():
        row["attncc_s"], row["sdpa_s"], row["flex_s"] = median_times([
            lambda: kernel(q, k, v, **ins),
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=name == "causal"),
            lambda: flex_cache["flex"](q, k, v, block_mask=bm)], reps)
    row["vs_sdpa"] = row["attncc_s"] / row["sdpa_s"]
    row["vs_flex"] = row["attncc_s"] / row["flex_s"]
    return row


FIRST_CALL = """
import time, torch, sys
sys.path.insert(0, {bench!r})
from bench_torch_cpu import spec_of, inputs_of, mask_mod_of, HEADS, DIM
n, name, which = {n}, {name!r}, {which!r}
q, k, v = (torch.randn(1, HEADS, n, DIM) for _ in range(3))
ins = inputs_of(name, n)
t0 = time.perf_counter()
if which == "attncc":
    import attncc.api
    kernel = attncc.api.compile(spec_of(name), backend="torch")
    kernel(q, k, v, **ins)
else:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    bm = create_block_mask(mask_mod_of(name, ins), 1, None, n, n, device="cpu")
    torch.compile(flex_attention, dynamic=False)(q, k, v, block_mask=bm)
print(time.perf_counter() - t0)
"""


def first_call(which: str, name: str, n: int) -> float:
    code = FIRST_CALL.format(bench=str(Path(__file__).parent), n=n, name=name, which=which)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"/tmp/attncc_bench_inductor_{time.time()}"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


PEAK = """
import os, threading, time, torch, sys
sys.path.insert(0, {bench!r})
from bench_torch_cpu import attncc_kernel
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
n, heads = {n}, {heads}
q, k, v = (torch.randn(1, heads, n, 64, requires_grad=True) for _ in range(3))
kernel = attncc_kernel("causal", {{"use_sdpa": False}})
base, peak, done = rss(), [0], []
def sample():
    while not done:
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)
thread = threading.Thread(target=sample)
thread.start()
kernel(q, k, v).sum().backward()
done.append(1)
thread.join()
print(peak[0] - base)
"""


def peak_memory(n: int, heads: int) -> int:
    code = PEAK.format(bench=str(Path(__file__).parent), n=n, heads=heads)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def machine() -> dict:
    from attncc.target import default_target

    target = default_target()
    return {"device": target.device, "cores": target.cores, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "load_before": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                  time.gmtime())}


def write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    m = results["machine"]
    lines = [f"# torch backend on CPU vs SDPA and compiled FlexAttention ({m['date']})", "",
             f"Machine: {m['device']} ({m['cores']} logical cores, torch {m['torch']}, "
             f"{m['threads']} threads); load average before {m['load_before']}, after "
             f"{m.get('load_after')}. float32, batch 1, {HEADS} heads, head_dim {DIM}; "
             "median of repeated runs after warm-up (the three interleaved per repetition); "
             "seconds.", "",
             "| variant | seq | density | attncc | SDPA | Flex | attncc/SDPA | attncc/Flex |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['variant']} | {r['seq']} | {r['density']:.3f} | "
                     f"{r['attncc_s']:.4f} | {r['sdpa_s']:.4f} | {r['flex_s']:.4f} | "
                     f"{r['vs_sdpa']:.2f} | {r['vs_flex']:.2f} |")
    lines += ["", "First call in a fresh process (compile + one call, seconds):", ""]
    lines += [f"- {k}: {v:.2f}" for k, v in results.get("first_call", {}).items()]
    lines += ["", "Peak resident memory growth of forward + backward (causal, block-plan path, "
              "no SDPA):", ""]
    lines += [f"- {k}: {v / 2**20:.0f} MiB" for k, v in results.get("peak_memory", {}).items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    # One compiled flex_attention serves every mask_mod; each is a recompile, and past dynamo's
    # default limit (8) flex would silently fall back to its unfused eager path.
    torch._dynamo.config.recompile_limit = 64
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=list(SPECS))
    parser.add_argument("--peak-seqs", type=int, nargs="*", default=[4096, 8192, 16384])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "torch_cpu"))
    args = parser.parse_args()
    results = {"machine": machine(), "rows": [], "first_call": {}, "peak_memory": {}}
    flex_cache: dict = {}
    for n in args.seqs:
        for name in args.variants:
            row = bench_row(name, n, args.reps, flex_cache)
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    for which in ("attncc", "flex"):
        results["first_call"][f"{which} sliding_window seq 2048"] = first_call(
            which, "sliding_window", 2048)
        print(results["first_call"], flush=True)
    for n in args.peak_seqs:
        results["peak_memory"][f"seq {n}, {HEADS} heads"] = peak_memory(n, HEADS)
        print(results["peak_memory"], flush=True)
    results["machine"]["load_after"] = os.getloadavg()
    write(results, Path(args.out))


if __name__ == "__main__":
    main()
