"""Half types on the CPU: the torch backend's bfloat16/float16 policy, measured side by side.

Three questions, each timed interleaved per repetition (medians), on this machine now:

1. Decoding steps (GQA 32/8, head_dim 128, bottom-right causal, plain and ALiBi) in bfloat16:
   attncc (the KV cache read as given) against SDPA in bfloat16, and against what an upcast
   costs (the cache cast to float32, then SDPA).
2. The tile loop (soft-capped causal fwd+bwd, seq 2048): float32 compute (the CPU policy)
   against mixed compute (half products, float32 results: the CUDA policy) in bfloat16 and
   float16.
3. Tiny Llama and Mistral in bfloat16: ``generate()`` tokens/s, attncc against sdpa.

    python bench/bench_half_cpu.py [--reps 7] [--out bench/results/half_cpu]

Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812 - the name torch code uses

import attncc
from attncc_torch import mixed

sys.path.insert(0, str(Path(__file__).parent))
from bench_torch_cpu import machine, report_head

TAIL = "kv_idx <= q_idx + seq_k - seq_q"
STEPS = [(4, 1, 16384), (1, 1, 32768), (8, 16, 4096)]
SPECS = {
    "plain": {"attncc": 1, "name": "plain", "heads": 32, "kv_heads": 8, "mask": TAIL},
    "alibi": {"attncc": 1, "name": "alibi", "heads": 32, "kv_heads": 8, "mask": TAIL,
              "score_mod": "score - slope[h] * (q_idx + seq_k - seq_q - kv_idx)",
              "inputs": {"slope": {"shape": ["heads"], "dtype": "float32"}}},
}


def medians(fns: dict, reps: int) -> dict:
    for fn in fns.values():
        fn()
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def decoding(reps: int) -> list[dict]:
    rows = []
    slope = torch.rand(32, generator=torch.Generator().manual_seed(0))
    for name, source in SPECS.items():
        kernel = attncc.compile(source, backend="torch")
        for batch, nq, nk in STEPS:
            gen = torch.Generator().manual_seed(1)
            q = torch.randn(batch, 32, nq, 128, generator=gen).bfloat16()
            k, v = (torch.randn(batch, 8, nk, 128, generator=gen).bfloat16() for _ in range(2))
            i, j = torch.arange(nq)[:, None] + nk - nq, torch.arange(nk)
            mask = (j <= i)[None, None]
            ins = {"slope": slope} if name == "alibi" else {}
            if name == "alibi":
                mask = (-slope[:, None, None] * (i - j)).masked_fill(~mask[0], float("-inf"))
                mask = mask[None]
            half = mask.bfloat16() if mask.is_floating_point() else mask

            def upcast(q=q, k=k, v=v, mask=mask):
                return F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                      attn_mask=mask, enable_gqa=True)

            t = medians({
                "attncc": lambda q=q, k=k, v=v, ins=ins, f=kernel: f(q, k, v, **ins),
                "sdpa": lambda q=q, k=k, v=v, m=half: F.scaled_dot_product_attention(
                    q, k, v, attn_mask=m, enable_gqa=True),
                "upcast": upcast}, reps)
            rows.append({"case": name, "batch": batch, "seq_q": nq, "seq_k": nk, "times": t})
            print(rows[-1], flush=True)
    return rows


def tile_loop(reps: int) -> list[dict]:
    spec = {"attncc": 1, "name": "softcap", "mask": "kv_idx <= q_idx",
            "score_mod": "50.0 * tanh(score / 50.0)"}
    kernel = attncc.compile(spec, backend="torch")
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        gen = torch.Generator().manual_seed(2)
        q, k, v = (torch.randn(1, 8, 2048, 64, generator=gen).to(dtype).requires_grad_()
                   for _ in range(3))

        def step(devices, q=q, k=k, v=v):
            mixed.MIXED_DEVICES = devices
            try:
                kernel(q, k, v).float().sum().backward()
            finally:
                mixed.MIXED_DEVICES = {"cuda"}

        t = medians({"float32": lambda: step({"cuda"}), "mixed": lambda: step({"cpu"})},
                    max(3, reps // 2))
        rows.append({"dtype": str(dtype).removeprefix("torch."), "times": t})
        print(rows[-1], flush=True)
    return rows


def models(reps: int) -> list[dict]:
    import bench_models as bm

    bm.register()
    rows = []
    for name in ("llama", "mistral"):
        model, base = bm.decoder(name, bm.FULL, 2048)
        impls = bm.runners(model.to(torch.bfloat16), base, ("base", "attncc"))
        ids = torch.randint(1, 1024, (1, 2048), generator=torch.Generator().manual_seed(0))
        found = bm.measure("generate", impls, {"input_ids": ids}, max(3, reps // 2), 128)
        rows.append({"model": name, "tok_s": {k: 128 / r["median"] for k, r in found.items()
                                              if "median" in r}})
        print(rows[-1], flush=True)
    return rows


def write(results: dict, out: Path) -> None:
    lines = report_head(results, out, "Half types on the CPU")
    lines[-1] += ". Medians of interleaved repetitions; milliseconds."
    lines += ["", "## Decoding steps in bfloat16 (GQA 32/8, head_dim 128)", "",
             "| case | B | seq_q | seq_k | attncc | SDPA bf16 | upcast + SDPA f32 | "
             "attncc/SDPA | upcast/SDPA |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["decoding"]:
        t = r["times"]
        lines.append(f"| {r['case']} | {r['batch']} | {r['seq_q']} | {r['seq_k']} | "
                     f"{t['attncc'] * 1e3:.1f} | {t['sdpa'] * 1e3:.1f} | "
                     f"{t['upcast'] * 1e3:.1f} | {t['attncc'] / t['sdpa']:.2f} | "
                     f"{t['upcast'] / t['sdpa']:.2f} |")
    lines += ["", "## Tile loop, soft-capped causal fwd+bwd at 2048 (8 heads, head_dim 64)", "",
              "| dtype | float32 compute (CPU policy) | mixed (CUDA policy) | mixed/float32 |",
              "|---|---|---|---|"]
    for r in results["tile_loop"]:
        t = r["times"]
        lines.append(f"| {r['dtype']} | {t['float32'] * 1e3:.1f} | {t['mixed'] * 1e3:.1f} | "
                     f"{t['mixed'] / t['float32']:.2f} |")
    lines += ["", "## generate() in bfloat16 (prefill 2048, 128 new tokens), tokens/s", "",
              "| model | sdpa | attncc | attncc/sdpa |", "|---|---|---|---|"]
    for r in results["models"]:
        t = r["tok_s"]
        lines.append(f"| {r['model']} | {t['sdpa']:.1f} | {t['attncc']:.1f} | "
                     f"{t['attncc'] / t['sdpa']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "half_cpu"))
    args = parser.parse_args()
    results = {"machine": machine(), "decoding": decoding(args.reps),
               "tile_loop": tile_loop(args.reps), "models": models(args.reps)}
    results["machine"]["load_after"] = os.getloadavg()
    write(results, Path(args.out))


if __name__ == "__main__":
    main()
