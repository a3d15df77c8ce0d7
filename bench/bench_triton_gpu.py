"""GPU benchmark: attncc's generated Triton kernels vs torch SDPA (flash) and FlexAttention.

bf16, batch 4, 16 heads, head_dim 128, seq 1k-16k; forward and forward+backward; dense, causal,
sliding window, document mask, prefix-LM, ALiBi, soft-capping. Prints TFLOP/s (FLOPs counted on the
kept pairs, as FlashAttention does) next to a measured bf16 matmul ceiling, and writes
``bench/results/<gpu>_<date>.md``. Exits cleanly (status 0, a message) without CUDA.

    python bench/bench_triton_gpu.py [--seqs 1024,4096,16384] [--specs causal,alibi] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH, HEADS, HEAD_DIM = 4, 16, 128
SPECS = {
    "dense": {}, "causal": {"mask": "kv_idx <= q_idx"},
    "sliding_window": {"mask": "kv_idx <= q_idx and q_idx - kv_idx < 1024"},
    "document": {"mask": "doc[b, q_idx] == doc[b, kv_idx]",
                 "inputs": {"doc": {"shape": ["batch", "seq_q"], "dtype": "int32"}}},
    "prefix_lm": {"mask": "kv_idx <= q_idx or kv_idx < prefix[b]",
                  "inputs": {"prefix": {"shape": ["batch"], "dtype": "int32"}}},
    "alibi": {"score_mod": "score - slope[h] * (q_idx - kv_idx)", "mask": "kv_idx <= q_idx",
              "inputs": {"slope": {"shape": ["heads"], "dtype": "float32"}}},
    "softcap": {"score_mod": "30.0 * tanh(score / 30.0)", "mask": "kv_idx <= q_idx"},
}


def timed(fn, reps: int = 10) -> float:
    """Median milliseconds of ``fn`` over ``reps`` CUDA-event timed runs after warm-up."""
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def matmul_ceiling() -> float:
    """Measured bf16 matmul TFLOP/s (8192^3), the roofline the kernels are compared to."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = timed(lambda: a @ a)
    return 2 * 8192 ** 3 / ms / 1e9


def inputs_for(name: str, seq: int):
    import torch

    dev, dt = "cuda", torch.bfloat16
    q, k, v = (torch.randn(BATCH, HEADS, seq, HEAD_DIM, device=dev, dtype=dt) for _ in "qkv")
    extra = {}
    if name == "document":
        extra["doc"] = torch.sort(torch.randint(0, 8, (BATCH, seq), device=dev), -1)[0].int()
    if name == "prefix_lm":
        extra["prefix"] = torch.randint(0, seq, (BATCH,), device=dev, dtype=torch.int32)
    if name == "alibi":
        extra["slope"] = torch.exp2(-torch.arange(1, HEADS + 1, device=dev) / 2).float()
    return q, k, v, extra


def flex_pieces(name: str, extra: dict):
    """(score_mod, mask_mod) for FlexAttention."""
    import torch

    def causal(b, h, q, kv):
        return kv <= q
    masks = {"dense": None, "causal": causal,
             "sliding_window": lambda b, h, q, kv: (kv <= q) & (q - kv < 1024),
             "document": lambda b, h, q, kv: extra["doc"][b, q] == extra["doc"][b, kv],
             "prefix_lm": lambda b, h, q, kv: (kv <= q) | (kv < extra["prefix"][b]),
             "alibi": causal, "softcap": causal}
    mods = {"alibi": lambda s, b, h, q, kv: s - extra["slope"][h] * (q - kv),
            "softcap": lambda s, b, h, q, kv: 30.0 * torch.tanh(s / 30.0)}
    return mods.get(name), masks[name]


def density(name: str, seq: int, extra: dict) -> float:
    import torch

    if name == "dense":
        return 1.0
    i = torch.arange(seq, device="cuda")
    causal = (i[None, :] <= i[:, None]).float().mean().item()
    if name == "sliding_window":
        return ((i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 1024)).float().mean().item()
    if name == "document":
        doc = extra["doc"]
        return (doc[:, :, None] == doc[:, None, :]).float().mean().item()
    return causal


def run_one(name: str, seq: int, backward: bool, ceiling: float) -> dict:
    import torch
    import torch.nn.functional as F  # noqa: N812
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import attncc
    from attncc.target import Target

    spec = attncc.load_spec({"attncc": 1, "name": name, "heads": HEADS, "head_dim": HEAD_DIM,
                             **SPECS[name]})
    kernel = attncc.compile(spec, backend="triton", target=Target.detect("cuda"))
    q, k, v, extra = inputs_for(name, seq)
    score_mod, mask_mod = flex_pieces(name, extra)
    block = (create_block_mask(mask_mod, BATCH, HEADS, seq, seq, device="cuda")
             if mask_mod else None)
    flex = torch.compile(flex_attention)
    flex_max = torch.compile(flex_attention, mode="max-autotune-no-cudagraphs")
    runs = {"attncc-triton": lambda q, k, v: kernel(q, k, v, **extra),
            "flex (compiled)": lambda q, k, v: flex(q, k, v, score_mod=score_mod,
                                                    block_mask=block),
            "flex (max-autotune)": lambda q, k, v: flex_max(q, k, v, score_mod=score_mod,
                                                            block_mask=block)}
    if name in ("dense", "causal"):
        runs["sdpa flash"] = lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, is_causal=name == "causal")
    flops = 4 * BATCH * HEADS * seq * seq * HEAD_DIM * density(name, seq, extra)
    flops *= 3.5 if backward else 1.0
    result = {"spec": name, "seq": seq, "pass": "fwd+bwd" if backward else "fwd"}
    for label, fn in runs.items():
        leaves = [x.detach().requires_grad_(backward) for x in (q, k, v)]
        grad = torch.randn_like(q)

        def step(fn=fn, leaves=leaves, grad=grad):
            out = fn(*leaves)
            if backward:
                out.backward(grad)
        try:
            ms = timed(step)
            tflops = flops / ms / 1e9
            result[label] = f"{tflops:.0f} TF/s ({100 * tflops / ceiling:.0f}%)"
        except Exception as err:  # a peer that cannot run this case is reported, not fatal
            result[label] = f"error: {type(err).__name__}"
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="1024,2048,4096,8192,16384")
    parser.add_argument("--specs", default=",".join(SPECS))
    parser.add_argument("--quick", action="store_true", help="seq 1024 and 4096 only")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench_triton_gpu: torch is not installed; skipping")
        return 0
    if not torch.cuda.is_available():
        print("bench_triton_gpu: no CUDA device; skipping (run this on a GPU machine)")
        return 0
    sys.path.insert(0, str(ROOT / "plugins"))
    seqs = [1024, 4096] if args.quick else [int(s) for s in args.seqs.split(",")]
    gpu = torch.cuda.get_device_name()
    ceiling = matmul_ceiling()
    print(f"{gpu}: bf16 matmul ceiling {ceiling:.0f} TFLOP/s")
    rows = []
    for name in args.specs.split(","):
        for seq in seqs:
            for backward in (False, True):
                row = run_one(name, seq, backward, ceiling)
                print(row)
                rows.append(row)
    labels = ["attncc-triton", "sdpa flash", "flex (compiled)", "flex (max-autotune)"]
    lines = [f"# Triton backend on {gpu}, {datetime.date.today()}", "",
             f"bf16, batch {BATCH}, heads {HEADS}, head_dim {HEAD_DIM}; matmul ceiling "
             f"{ceiling:.0f} TFLOP/s; FLOPs on kept pairs (bwd = 2.5x fwd)", "",
             "| spec | seq | pass | " + " | ".join(labels) + " |",
             "|" + "---|" * (3 + len(labels))]
    for row in rows:
        cells = [row["spec"], str(row["seq"]), row["pass"], *(row.get(lb, "-") for lb in labels)]
        lines.append("| " + " | ".join(cells) + " |")
    out = ROOT / "bench" / "results" / (f"{gpu.replace(' ', '_')}_{datetime.date.today()}.md")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0 if math.isfinite(ceiling) else 1


if __name__ == "__main__":
    sys.exit(main())
