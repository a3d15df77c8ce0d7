"""A tiny Llama's forward + backward at seq 2048 on CPU: attncc against sdpa and flex_attention.

The same model (random weights, float32, batch 1, 2 layers, hidden 256, 8 heads, 4 kv heads) runs
with ``attn_implementation`` = ``sdpa``, ``flex_attention`` (transformers compiles
FlexAttention) and ``attncc`` (``attncc.integrations.transformers.register``), and with
``--compile`` also ``torch.compile(model)`` on ``sdpa`` and on ``attncc`` (the attention a
library op, no graph break). Each is timed as the median of ``--reps`` forward+backward steps
after warm-up; ratios are against sdpa.

    python bench/bench_llama.py [--seq 2048] [--reps 5] [--compile]
        [--out bench/results/llama_cpu.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from attncc.integrations.transformers import register

IMPLS = ("sdpa", "flex_attention", "attncc")
COMPILED = ("sdpa+compile", "attncc+compile")


def step(model, ids, backward: bool) -> None:
    model.zero_grad(set_to_none=True)
    if backward:
        model(input_ids=ids, labels=ids).loss.backward()
        return
    with torch.no_grad():
        model(input_ids=ids)


def time_impl(model, impl: str, ids, reps: int, warmup: int,
              backward: bool) -> tuple[float, float, float]:
    """``(first call s, median s, interquartile spread s)`` of forward (+ backward); an
    ``impl+compile`` runs ``torch.compile(model)`` (its first call includes the compile)."""
    name, compiled = impl.removesuffix("+compile"), impl.endswith("+compile")
    model.set_attn_implementation(name)
    if compiled:
        torch._dynamo.reset()
    run = torch.compile(model) if compiled else model

    def step_(m, i):
        step(run, i, backward)

    start = time.perf_counter()
    step_(model, ids)
    first = time.perf_counter() - start
    for _ in range(warmup):
        step_(model, ids)
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        step_(model, ids)
        samples.append(time.perf_counter() - start)
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return first, statistics.median(samples), q[2] - q[0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile(model) on sdpa and attncc")
    parser.add_argument("--out", default="bench/results/llama_cpu.md")
    args = parser.parse_args(argv)
    register("attncc")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=args.seq, attention_dropout=0.0)
    model = LlamaForCausalLM(config).train()
    ids = torch.randint(0, config.vocab_size, (1, args.seq))
    lines = []
    for mode, backward in (("forward+backward", True), ("forward only (no_grad)", False)):
        lines += table(model, ids, args, mode, backward)
    lines = [f"# Tiny Llama forward+backward, seq {args.seq}, CPU", "",
             f"{date.today()} · {platform.processor() or platform.machine()} · "
             f"{torch.get_num_threads()} threads · torch {torch.__version__} · "
             "float32, batch 1, 2 layers, hidden 256, 8 heads / 4 kv heads (GQA), causal", "",
             f"Median of {args.reps} steps after {args.warmup} warm-up; spread = interquartile "
             "range; ratio = time / sdpa time (lower is faster). First call includes "
             "compilation (FlexAttention's torch.compile, attncc's spec compile). Timings on a "
             "shared machine are noisy; read the ratios, not the digits.", "", *lines]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


def table(model, ids, args, mode: str, backward: bool) -> list[str]:
    """Markdown rows of one mode, every implementation side by side."""
    rows = {}
    for impl in IMPLS + (COMPILED if args.compile else ()):
        try:
            rows[impl] = time_impl(model, impl, ids, args.reps, args.warmup, backward)
        except Exception as err:  # a peer that cannot run here is reported, not fatal
            rows[impl] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        print(mode, impl, rows[impl], flush=True)
    base = rows["sdpa"][1] if isinstance(rows["sdpa"], tuple) else None
    lines = [f"## {mode}", "",
             "| attn_implementation | first call (s) | median (s) | spread (s) | ratio vs sdpa |",
             "|---|---|---|---|---|"]
    for impl, row in rows.items():
        if isinstance(row, str):
            lines.append(f"| {impl} | failed: {row} | | | |")
            continue
        ratio = f"{row[1] / base:.2f}x" if base else "-"
        lines.append(f"| {impl} | {row[0]:.2f} | {row[1]:.3f} | {row[2]:.3f} | {ratio} |")
    return [*lines, ""]


if __name__ == "__main__":
    main()
