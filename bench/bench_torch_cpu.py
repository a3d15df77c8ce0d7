"""The torch backend's benchmark of record: attncc vs torch SDPA and compiled FlexAttention on CPU.

float32, batch 1, 8 heads (GQA cases 8 query / 2 kv heads), head_dim 64. Every case times
attncc (defaults), attncc with the shipped tuning records (``attncc.compile(..., seq=n)``), SDPA
(``is_causal`` / ``enable_gqa`` / an explicit bool or float mask built outside the timing) and
compiled FlexAttention (forward only: it has no CPU backward; never for decoding, whose KV
length changes every step), interleaved within each repetition; medians and ratios. Modes:
``fwd``, ``fwdbwd`` (forward + backward of ``out.sum()``) and ``decode`` (seq_q 1-16 against a
KV cache of 4k-32k keys, batch 1-8, bottom-right causal, GQA 32/8, head_dim 128: plain, with
left padding per batch entry, with ALiBi, and Gemma-2's soft-capped window, whose peer is eager
as SDPA cannot express it). Soft-capped training has neither SDPA nor a Flex CPU backward: its
peer is eager attention up to seq ``EAGER_MAX``. ``floor_s`` is the useful-FLOP
time at the sgemm rate measured in the same run (kept pairs only; backward = 2.5x forward).
Also: the first call in a fresh process, and the peak resident memory of forward + backward up
to seq 16384.

    python bench/bench_torch_cpu.py [--seqs 2048 8192] [--reps 5] [--cases alibi gqa_causal]
        [--modes fwd fwdbwd decode] [--out bench/results/torch_cpu]

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
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812 - the name torch code uses

import attncc
import attncc.api
from attncc.passes.pipeline import lower
from attncc_torch import TorchBackend

HEADS, DIM = 8, 64
WINDOW, DOCS, N_GLOBAL, LF_WINDOW, BB_BLOCK, BB_RANDOM, PREFIX, CAP = (
    256, 4, 64, 128, 64, 3, 512, 50.0)
#: (batch, seq_q, KV length) of the decode mode: batch 1-8, 1-16 query rows, 4k-32k keys
DECODE = [(1, 1, 4096), (1, 1, 32768), (4, 1, 4096), (4, 1, 16384), (4, 4, 16384),
          (8, 1, 8192), (8, 16, 4096)]
#: Left padding of each batch entry in ``decoding_padded`` (a fraction of the keys).
PAD_FRACTION = 0.125
NEG = float("-inf")

SLOPE = {"slope": {"shape": ["heads"], "dtype": "float32"}}
SPECS = {
    "dense": {"mask": None},
    "causal": {"mask": "kv_idx <= q_idx"},
    "gqa_causal": {"mask": "kv_idx <= q_idx", "kv_heads": 2},
    "alibi": {"mask": "kv_idx <= q_idx", "score_mod": "score - slope[h] * (q_idx - kv_idx)",
              "inputs": SLOPE},
    "softcap": {"mask": "kv_idx <= q_idx", "score_mod": f"{CAP} * tanh(score / {CAP})"},
    "relative_bias": {"mask": None, "score_mod": "score + rel[h, q_idx - kv_idx + seq_k - 1]",
                      "inputs": {"rel": {"shape": ["heads", "seq_q + seq_k - 1"],
                                         "dtype": "float32"}}},
    "prefix_lm": {"mask": f"kv_idx <= q_idx or kv_idx < {PREFIX}"},
    "sliding_window": {"mask": f"kv_idx <= q_idx and q_idx - kv_idx < {WINDOW}"},
    "gqa_window": {"mask": f"kv_idx <= q_idx and q_idx - kv_idx < {WINDOW}", "kv_heads": 2},
    "softcap_window": {"mask": f"kv_idx <= q_idx and q_idx - kv_idx < {WINDOW}", "kv_heads": 2,
                       "score_mod": f"{CAP} * tanh(score / {CAP})"},
    "document_mask": {"mask": "doc[b, q_idx] == doc[b, kv_idx]",
                      "inputs": {"doc": {"shape": ["batch", "seq_q"], "dtype": "int32"}}},
    "longformer": {"mask": f"abs(q_idx - kv_idx) <= {LF_WINDOW} or q_idx < {N_GLOBAL} "
                           f"or kv_idx < {N_GLOBAL}"},
    "bigbird": {"mask": f"abs(q_idx - kv_idx) <= {LF_WINDOW} or q_idx < {N_GLOBAL} or kv_idx < "
                        f"{N_GLOBAL} or rand_blocks[q_idx // {BB_BLOCK}, kv_idx // {BB_BLOCK}]",
                "inputs": {"rand_blocks": {"shape": [f"seq_q // {BB_BLOCK}",
                                                     f"seq_k // {BB_BLOCK}"], "dtype": "bool"}}},
    "decoding": {"mask": "kv_idx <= q_idx + seq_k - seq_q", "heads": 32, "kv_heads": 8},
    "decoding_padded": {"mask": "kv_idx <= q_idx + seq_k - seq_q and keep[b, kv_idx]",
                        "heads": 32, "kv_heads": 8,
                        "inputs": {"keep": {"shape": ["batch", "seq_k"], "dtype": "bool"}}},
    "decoding_alibi": {"mask": "kv_idx <= q_idx + seq_k - seq_q", "heads": 32, "kv_heads": 8,
                       "score_mod": "score - slope[h] * (q_idx + seq_k - seq_q - kv_idx)",
                       "inputs": SLOPE},
    "decoding_softcap_window": {"mask": f"kv_idx <= q_idx + seq_k - seq_q and q_idx + seq_k - "
                                        f"seq_q - kv_idx < {WINDOW * 16}", "heads": 32,
                                "kv_heads": 8, "score_mod": f"{CAP} * tanh(score / {CAP})"},
}
DECODING = ("decoding", "decoding_padded", "decoding_alibi", "decoding_softcap_window")
#: The modes each case is timed in (decoding has its own sizes, ``DECODE``).
MODES = {name: ("fwd", "fwdbwd") for name in SPECS}
MODES.update(dict.fromkeys(DECODING, ("decode",)))


def spec_of(name: str):
    body = {k: v for k, v in SPECS[name].items() if v is not None}
    return attncc.load_spec({"attncc": 1, "name": f"bench_{name}", **body})


def inputs_of(name: str, n: int, batch: int = 1) -> dict:
    gen = torch.Generator().manual_seed(0)
    if name == "decoding_padded":  # batched generation: left padding of varied lengths
        keep = torch.ones(batch, n, dtype=torch.bool)
        for i in range(batch):
            keep[i, :int(PAD_FRACTION * n * i / max(batch - 1, 1))] = False
        return {"keep": keep}
    if name == "decoding_alibi":
        return {"slope": torch.tensor([2.0 ** -(8 * (i + 1) / 32) for i in range(32)])}
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
    if name == "alibi":
        return {"slope": torch.tensor([2.0 ** -(i + 1) for i in range(HEADS)])}
    if name == "relative_bias":
        return {"rel": 0.1 * torch.randn(HEADS, 2 * n - 1, generator=gen)}
    return {}


def mask_mod_of(name: str, ins: dict):
    """FlexAttention's mask_mod (None: no mask)."""
    causal = lambda b, h, q, kv: kv <= q  # noqa: E731
    lf = lambda b, h, q, kv: ((q - kv).abs() <= LF_WINDOW) | (q < N_GLOBAL) | (kv < N_GLOBAL)  # noqa: E731
    if name in ("dense", "relative_bias"):
        return None
    if name in ("causal", "gqa_causal", "alibi", "softcap"):
        return causal
    if name in ("sliding_window", "gqa_window", "softcap_window"):
        return lambda b, h, q, kv: (kv <= q) & (q - kv < WINDOW)
    if name == "prefix_lm":
        return lambda b, h, q, kv: (kv <= q) | (kv < PREFIX)
    if name == "document_mask":
        doc = ins["doc"]
        return lambda b, h, q, kv: doc[b, q] == doc[b, kv]
    if name == "longformer":
        return lf
    rb = ins["rand_blocks"]
    return lambda b, h, q, kv: lf(b, h, q, kv) | rb[q // BB_BLOCK, kv // BB_BLOCK]


def score_mod_of(name: str, ins: dict):
    """FlexAttention's score_mod (None: the plain score)."""
    if name == "alibi":
        slope = ins["slope"]
        return lambda s, b, h, q, kv: s - slope[h] * (q - kv)
    if name in ("softcap", "softcap_window"):
        return lambda s, b, h, q, kv: CAP * torch.tanh(s / CAP)
    if name == "relative_bias":
        rel, n = ins["rel"], (ins["rel"].shape[1] + 1) // 2
        return lambda s, b, h, q, kv: s + rel[h, q - kv + n - 1]
    return None


def sdpa_of(name: str, n: int, ins: dict):
    """``fn(q, k, v)``: the SDPA peer (None where SDPA cannot express the case), its masks
    built here, outside the timing."""
    gqa = SPECS[name].get("kv_heads") is not None
    if name in ("dense", "causal", "gqa_causal"):
        return lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, is_causal=name != "dense", enable_gqa=gqa)
    if name in ("softcap", "softcap_window"):
        return None
    i = torch.arange(n)
    if name == "alibi":
        bias = -ins["slope"][:, None, None] * (i[:, None] - i[None, :])
        mask = bias.masked_fill(i[None, :] > i[:, None], NEG)[None]
    elif name == "relative_bias":
        mask = ins["rel"][:, i[:, None] - i[None, :] + n - 1][None]
    else:
        mod = mask_mod_of(name, ins)
        mask = torch.cat([mod(0, 0, i[r:r + 512, None], i[None]) for r in range(0, n, 512)])
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                          enable_gqa=gqa)


#: The longest sequence the eager peer runs (its N^2 score tensors, several per backward).
EAGER_MAX = 4096


def eager_of(name: str, n: int, ins: dict):
    """``fn(q, k, v)``: eager attention as transformers' eager path computes it (K/V repeated
    per query head, scores, score_mod, the mask, softmax, ``@ v``) for a case neither SDPA nor
    Flex can train (a non-additive score_mod: Flex has no CPU backward); None past
    ``EAGER_MAX``."""
    if n > EAGER_MAX:
        return None
    mod, sm = mask_mod_of(name, ins), score_mod_of(name, ins)
    i = torch.arange(n)
    keep = mod(0, 0, i[:, None], i[None]) if mod else None

    def fn(q, k, v):
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        s = sm(s, 0, 0, 0, 0) if sm else s
        s = s.masked_fill(~keep, float("-inf")) if keep is not None else s
        return torch.softmax(s, dim=-1) @ v

    return fn


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


def sgemm_rate(reps: int = 5) -> float:
    """Peak float32 matmul FLOP/s on this machine now: the best of a square 2048^3 product and
    the batched shapes of attention's two products over 8 heads ((8, 2048, 64) @ (8, 64, 2048),
    (8, 2048, 2048) @ (8, 2048, 64)), each the fastest of ``reps`` calls. A floor must be a lower
    bound on time, so the rate is the highest measured, not a typical one."""
    a, b = torch.randn(8, 2048, DIM), torch.randn(8, DIM, 2048)
    p, sq = torch.randn(8, 2048, 2048), torch.randn(2048, 2048)
    flops = (2 * 2048 ** 3, 2 * 8 * 2048 * 2048 * DIM, 2 * 8 * 2048 * 2048 * DIM)
    best = []
    for fn in (lambda: sq @ sq, lambda: a @ b, lambda: p @ a):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        best.append(min(ts))
    return max(f / t for f, t in zip(flops, best, strict=True))


def kept_pairs(name: str, nq: int, nk: int, ins: dict) -> float:
    """Kept (query, key) pairs of the mask."""
    mod = mask_mod_of(name, ins)
    if mod is None:
        return nq * nk
    i = torch.arange(nq)
    return float(sum(int(mod(0, 0, i[r:r + 512, None], i[None]).sum())
                     for r in range(0, nq, 512)))


def attncc_kernel(name: str, config: dict | None = None):
    spec = spec_of(name)
    backend = TorchBackend()
    graph = lower(spec)
    return backend.compile(graph, {**backend.default_config(graph, None), **(config or {})}, None)


@dataclass
class Row:
    case: str
    mode: str
    seq_q: int
    seq_k: int
    density: float
    floor_s: float
    times: dict = field(default_factory=dict)
    batch: int = 1

    @property
    def peer(self) -> str | None:
        """The peer the ratios divide by: SDPA, else compiled Flex, else eager."""
        return next((p for p in ("sdpa", "flex", "eager") if p in self.times), None)

    def ratios(self) -> dict:
        peer = self.peer
        return {f"{k}/{peer}": v / self.times[peer]
                for k, v in self.times.items() if peer and k.startswith("attncc")}


def decode_peer(name: str, nq: int, nk: int, ins: dict):
    """``(fn(q, k, v), kept pairs per batch entry and head)`` of a decoding case: SDPA with the
    bottom-right mask (and padding, or ALiBi's bias) built here, outside the timing; eager
    (transformers' recipe: scores, soft-capping, mask, softmax) where SDPA cannot express it."""
    i = torch.arange(nq)[:, None] + nk - nq
    j = torch.arange(nk)[None]
    keep = (j <= i)[None, None]
    if name == "decoding_padded":
        keep = keep & ins["keep"][:, None, None, :]
    if name == "decoding_softcap_window":
        keep = keep & (i - j < WINDOW * 16)
        bias = torch.zeros(keep.shape).masked_fill(~keep, NEG)

        def eager(q, k, v):  # grouped heads as one (B, Hkv, G * nq, D) matmul: no K/V copy
            b, h, n, d = q.shape
            q5 = q.reshape(b, k.shape[1], h // k.shape[1] * n, d)
            s = (q5 @ k.mT * d ** -0.5).reshape(b, h, n, -1)
            s = CAP * torch.tanh(s / CAP) + bias
            p = torch.softmax(s, -1).reshape(b, k.shape[1], -1, k.shape[2])
            return (p @ v).reshape(b, h, n, -1)

        return eager, float(keep.sum()) / keep.shape[0]
    mask = None if nq == 1 and name == "decoding" else keep
    if name == "decoding_alibi":
        mask = (-ins["slope"][:, None, None] * (i - j)).masked_fill(~keep[0], NEG)[None]
    return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                           enable_gqa=True),
            float(keep.sum()) / keep.shape[0])


def bench_row(name: str, mode: str, sizes: tuple, reps: int, flex: dict, rate: float) -> Row:
    from torch.nn.attention.flex_attention import create_block_mask

    spec = spec_of(name)
    heads = spec.heads or HEADS
    kv_heads, dim = spec.kv_heads or heads, 128 if mode == "decode" else DIM
    batch, nq, nk = sizes
    gen = torch.Generator().manual_seed(1)
    grad = mode == "fwdbwd"
    q = torch.randn(batch, heads, nq, dim, generator=gen, requires_grad=grad)
    k, v = (torch.randn(batch, kv_heads, nk, dim, generator=gen, requires_grad=grad)
            for _ in range(2))
    ins = inputs_of(name, nk, batch)
    peer, pairs = (decode_peer(name, nq, nk, ins) if mode == "decode"
                   else (sdpa_of(name, nq, ins), kept_pairs(name, nq, nk, ins)))
    flops = 4 * batch * heads * pairs * dim * (3.5 if grad else 1.0)
    row = Row(name, mode, nq, nk, pairs / (nq * nk), flops / rate, batch=batch)
    default = attncc_kernel(name)
    fns = {"attncc": lambda q, k, v: default(q, k, v, **ins)}
    shipped = attncc.api.compile(spec, backend="torch", seq=nq, seq_k=nk)
    fns["attncc_records"] = lambda q, k, v: shipped(q, k, v, **ins)
    if peer is not None:
        fns["eager" if name == "decoding_softcap_window" else "sdpa"] = peer
    elif grad:  # no SDPA and no Flex backward: eager attention
        eager = eager_of(name, nq, ins)
        if eager is not None:
            fns["eager"] = eager
    if not grad and mode != "decode":
        mod = mask_mod_of(name, ins)
        bm = create_block_mask(mod, 1, None, nq, nk, device="cpu") if mod else None
        sm = score_mod_of(name, ins)
        fns["flex"] = lambda q, k, v: flex["fn"](q, k, v, score_mod=sm, block_mask=bm,
                                                 enable_gqa=kv_heads != heads)
    if grad:
        calls = [lambda f=f: f(q, k, v).sum().backward() for f in fns.values()]
    else:
        calls = [lambda f=f: f(q, k, v) for f in fns.values()]
    with torch.set_grad_enabled(grad):
        row.times = dict(zip(fns, median_times(calls, reps), strict=True))
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


def report_head(results: dict, out: Path, title: str) -> list[str]:
    """Writes ``<out>.json``; the report's first lines: ``title`` with the date, then the
    machine and its load (a sentence the caller goes on with)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    m = results["machine"]
    return [f"# {title} ({m['date']})", "",
            f"Machine: {m['device']} ({m['cores']} logical cores, torch {m['torch']}, "
            f"{m['threads']} threads); load average before {m['load_before']}, after "
            f"{m.get('load_after')}"]


def write(results: dict, out: Path) -> None:
    lines = report_head(results, out, "torch backend on CPU vs SDPA and compiled FlexAttention")
    lines[-1] += (
        f"; sgemm {results['sgemm_gflops']:.1f} GFLOP/s. float32, "
        f"batch 1, {HEADS} heads, head_dim {DIM} (decode: 32/8 heads, head_dim 128, the "
        "batch given); medians of interleaved repetitions; milliseconds. `records`: attncc "
        "with the shipped tuning records; `floor`: useful FLOPs at the sgemm rate; peer: "
        "SDPA where it expresses the case, else compiled Flex, else eager (soft-capped "
        "decoding and training).")
    lines += ["",
              "| case | mode | B | seq_q | seq_k | density | floor | attncc | records | SDPA "
              "| Flex | eager | attncc/peer | records/peer |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ms = lambda t: "–" if t is None else f"{t * 1e3:.1f}"  # noqa: E731
    for r in results["rows"]:
        t, ratios = r["times"], list(r["ratios"].items())
        named = dict(ratios)
        peer = next((p for p in ("sdpa", "flex", "eager") if p in t), None)
        lines.append(
            f"| {r['case']} | {r['mode']} | {r.get('batch', 1)} | {r['seq_q']} | {r['seq_k']} | "
            f"{r['density']:.3f} | {ms(r['floor_s'])} | {ms(t.get('attncc'))} | "
            f"{ms(t.get('attncc_records'))} | {ms(t.get('sdpa'))} | {ms(t.get('flex'))} | "
            f"{ms(t.get('eager'))} | "
            f"{named.get(f'attncc/{peer}', float('nan')):.2f} | "
            f"{named.get(f'attncc_records/{peer}', float('nan')):.2f} |")
    lines += ["", "First call in a fresh process (compile + one call, seconds):", ""]
    lines += [f"- {k}: {v:.2f}" for k, v in results.get("first_call", {}).items()]
    lines += ["", "Peak resident memory growth of forward + backward (causal, block-plan path, "
              "no SDPA):", ""]
    lines += [f"- {k}: {v / 2**20:.0f} MiB" for k, v in results.get("peak_memory", {}).items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    # One compiled flex_attention serves every case; each mask/score mod is a recompile, and
    # past dynamo's default limit (8) flex would silently fall back to its unfused eager path.
    torch._dynamo.config.recompile_limit = 64
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--cases", nargs="+", default=list(SPECS))
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd", "decode"])
    parser.add_argument("--decode", type=int, nargs="+", default=None,
                        help="batch seq_q kv triples, flattened (default: DECODE)")
    parser.add_argument("--peak-seqs", type=int, nargs="*", default=[4096, 8192, 16384])
    parser.add_argument("--first-call", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "torch_cpu"))
    args = parser.parse_args()
    decode = (list(zip(*(args.decode[i::3] for i in range(3)), strict=True)) if args.decode
              else DECODE)
    from torch.nn.attention.flex_attention import flex_attention

    # every (case, seq) is one recompile of flex_attention: past dynamo's limit (8) it would
    # fall back to its unfused eager path and time the wrong thing
    torch._dynamo.config.recompile_limit = 4 * len(SPECS) * len(args.seqs)
    flex = {"fn": torch.compile(flex_attention, dynamic=False)}
    rate = sgemm_rate()
    results = {"machine": machine(), "sgemm_gflops": rate / 1e9, "rows": [], "first_call": {},
               "peak_memory": {}}
    for name in args.cases:
        for mode in (m for m in MODES[name] if m in args.modes):
            sizes = decode if mode == "decode" else [(1, n, n) for n in args.seqs]
            for size in sizes:
                row = bench_row(name, mode, size, args.reps, flex, rate)
                record = {**row.__dict__, "ratios": row.ratios()}
                results["rows"].append(record)
                print(json.dumps(record), flush=True)
    results["sgemm_gflops_after"] = sgemm_rate() / 1e9
    if args.first_call:
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
