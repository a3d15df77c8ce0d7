"""Gradients through the fused-runs path (runs.py + runs_grad.py) against the float64 reference.

q, k, v gradients by the conformance rule (``attncc.testing.accuracy.judge``: the error against
float64 within a small factor of the same-dtype eager error) for masked specs on the segment loop:
bands, documents, global tokens, random blocks, prefixes, GQA, an additive bias, ragged sizes,
more keys than queries and rows with no kept key. Every test asserts the path was taken: the tile
loop (``FlashAttention``) raises if called, and the segment backward is counted.
"""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.reference import attend
from attncc.testing import random_inputs
from attncc.testing.accuracy import check_kernel, eager_attend, judge, magnitude
from attncc_torch import runs, runs_grad
from attncc_torch.flash import FlashAttention

GQA_WINDOW = {"attncc": 1, "name": "gqa_window", "heads": 4, "kv_heads": 2,
              "mask": "kv_idx <= q_idx and q_idx - kv_idx < 24"}
ALIBI_WINDOW = {"attncc": 1, "name": "alibi_window", "heads": 4, "kv_heads": 2,
                "score_mod": "score - slope[h] * (q_idx - kv_idx) + 0.25 * q_idx",
                "mask": "kv_idx <= q_idx and q_idx - kv_idx < 24",
                "inputs": {"slope": {"shape": ["heads"], "dtype": "float32"}}}
GENERAL_BIAS = {"attncc": 1, "name": "general_bias", "score_mod": "score - 0.1 * abs(q_idx - "
                "kv_idx)", "mask": "abs(q_idx - kv_idx) <= 20"}
PAD = {"attncc": 1, "name": "pad", "mask": "kv_idx < lengths[b] and q_idx < qlen[b]",
       "inputs": {"lengths": {"shape": ["batch"], "dtype": "int64"},
                  "qlen": {"shape": ["batch"], "dtype": "int64"}}}

CASES = {
    "sliding_window": ("examples/sliding_window.yaml", 77, 77),
    "sliding_window_cross": ("examples/sliding_window.yaml", 40, 77),
    "document_mask": ("examples/document_mask.yaml", 77, 77),
    "longformer": ("examples/longformer.yaml", 70, 70),
    "longformer_cross": ("examples/longformer.yaml", 77, 50),
    "bigbird": ("examples/bigbird.yaml", 96, 96),
    "prefix_lm": ("examples/prefix_lm.yaml", 77, 77),
    "dilated_window": ("examples/dilated_window.yaml", 64, 64),
    "gqa_window": (GQA_WINDOW, 77, 77),
    "alibi_window": (ALIBI_WINDOW, 77, 77),
    "general_bias": (GENERAL_BIAS, 61, 61),
}


@pytest.fixture
def segment_backward(monkeypatch):
    """Counts segment backwards; the tile loop fails the test if it runs."""
    counter = {"n": 0}
    original = runs_grad.SegmentCalls.backward

    def counted(ctx, *grads):
        counter["n"] += 1
        return original(ctx, *grads)

    def refused(*args, **kwargs):
        raise AssertionError("the tile loop ran instead of the runs path")

    monkeypatch.setattr(runs_grad.SegmentCalls, "backward", staticmethod(counted))
    monkeypatch.setattr(FlashAttention, "apply", refused)
    return counter


def _check_grads(kernel, spec, q, k, v, inputs, seed=0):
    """q, k, v gradients of ``kernel`` judged against float64 autograd of the reference (the
    floating inputs held fixed, so the runs path serves them)."""
    grad_out = torch.randn(q.shape[:3] + v.shape[3:], dtype=torch.float64,
                           generator=torch.Generator().manual_seed(seed))

    def run(fn, cast):
        leaves = [cast(x).detach().clone().requires_grad_() for x in (q, k, v)]
        ins = {n: cast(x) if x.is_floating_point() else x for n, x in inputs.items()}
        out = fn(*leaves, ins)
        out.backward(grad_out.to(out.dtype))
        return [x.grad for x in leaves]

    got = run(lambda q_, k_, v_, ins: kernel(q_, k_, v_, **ins), lambda x: x)
    ref = run(lambda q_, k_, v_, ins: attend(spec, q_, k_, v_, ins), lambda x: x.double())
    eager = run(lambda q_, k_, v_, ins: eager_attend(spec, q_, k_, v_, ins, False)[0],
                lambda x: x)
    scale = max(magnitude(r) for r in ref)
    dtype = str(q.dtype).removeprefix("torch.")
    for name, g, e, r in zip("qkv", got, eager, ref, strict=True):
        check = judge(f"grad {name}", g, e, r, dtype, scale)
        assert check.ok, str(check)


def _spec(source):
    return attncc.load_spec(source)


@pytest.mark.parametrize("name", list(CASES))
def test_runs_gradients_match_the_reference(name, segment_backward):
    source, seq_q, seq_k = CASES[name]
    spec = _spec(source)
    kernel = attncc.compile(spec, backend="torch", config={"use_sdpa": True, "block_m": 16,
                                                           "block_n": 16})
    q, k, v, inputs = random_inputs(spec, 2, seq_q, seq_k, "float32", seed=3, library="torch",
                                    head_dim=16, value_dim=16)
    _check_grads(kernel, spec, q, k, v, inputs)
    assert segment_backward["n"] == 1


def test_rows_with_no_kept_key_get_zero_gradients(segment_backward):
    spec = _spec(PAD)
    kernel = attncc.compile(spec, backend="torch", config={"use_sdpa": True, "block_m": 16,
                                                           "block_n": 16})
    q, k, v = (torch.randn(2, 3, 40, 8, generator=torch.Generator().manual_seed(i))
               for i in range(3))
    inputs = {"lengths": torch.tensor([0, 17]), "qlen": torch.tensor([40, 23])}
    _check_grads(kernel, spec, q, k, v, inputs)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    kernel(*leaves, **inputs).sum().backward()
    dq, dk, dv = (x.grad for x in leaves)
    assert torch.all(dq[0] == 0) and torch.all(dq[1, :, 23:] == 0)
    assert torch.all(dk[:, :, 17:] == 0) and torch.all(dv[:, :, 17:] == 0)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert segment_backward["n"] == 2


def test_runs_backward_is_deterministic(segment_backward):
    spec = _spec("examples/longformer.yaml")
    kernel = attncc.compile(spec, backend="torch", config={"use_sdpa": True, "block_m": 16,
                                                           "block_n": 16})
    q, k, v, _ = random_inputs(spec, 1, 96, 96, "float32", seed=5, library="torch",
                               head_dim=16, value_dim=16)
    grads = []
    for _ in range(2):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        kernel(*leaves).square().sum().backward()
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_a_bias_input_that_needs_a_gradient_takes_the_tile_loop():
    """ALiBi slopes as a learnable parameter: their gradient comes from the tile loop (exact)."""
    spec = _spec(ALIBI_WINDOW)
    kernel = attncc.compile(spec, backend="torch", config={"use_sdpa": True, "block_m": 16,
                                                           "block_n": 16})
    q, k, v, inputs = random_inputs(spec, 1, 50, 50, "float64", seed=2, library="torch",
                                    head_dim=16, value_dim=16)
    slope = inputs["slope"].clone().requires_grad_()
    kernel(q, k, v, slope=slope).sum().backward()
    want = inputs["slope"].clone().requires_grad_()
    attend(spec, q, k, v, {"slope": want}).sum().backward()
    torch.testing.assert_close(slope.grad, want.grad)


def test_a_bias_at_the_dtype_minimum_trains_through_the_tile_loop(monkeypatch):
    """transformers' padding bias (float32 min on every key of a row) loses log(sum) in a fused
    backward: the runs path gives the call to the tile loop, whose gradients are right."""
    spec = _spec({"attncc": 1, "name": "pad_bias", "score_mod": "score + pad[b, kv_idx]",
                  "mask": "abs(q_idx - kv_idx) <= 20",
                  "inputs": {"pad": {"shape": ["batch", "seq_k"], "dtype": "float32"}}})
    kernel = attncc.compile(spec, backend="torch", config={"use_sdpa": True, "block_m": 16,
                                                           "block_n": 16})
    q, k, v, _ = random_inputs(spec, 2, 48, 48, "float32", seed=1, library="torch",
                               head_dim=16, value_dim=16)
    pad = torch.zeros(2, 48)
    pad[0, 30:] = torch.finfo(torch.float32).min
    tiles = {"n": 0}
    original = FlashAttention.apply

    def counted(*args):
        tiles["n"] += 1
        return original(*args)

    monkeypatch.setattr(FlashAttention, "apply", counted)
    _check_grads(kernel, spec, q, k, v, {"pad": pad})
    assert tiles["n"] == 1


HALF_CASES = ["sliding_window", "document_mask", "longformer_cross", "gqa_window",
              "general_bias"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", HALF_CASES)
def test_half_types_on_the_runs_path(name, dtype, segment_backward, monkeypatch):
    """Out, lse and q, k, v gradients by the conformance rule in each half type; bfloat16 reaches
    the fused kernels in bfloat16 where the CPU has bfloat16 matmuls (native), float16 in
    float32 (upcast)."""
    source, seq_q, seq_k = CASES[name]
    spec = _spec(source)
    kernel = attncc.compile(spec, backend="torch", config={"use_sdpa": True, "block_m": 16,
                                                           "block_n": 16})
    q, k, v, inputs = random_inputs(spec, 2, seq_q, seq_k, dtype, seed=4, library="torch",
                                    head_dim=16, value_dim=16)
    seen = set()
    original = runs.RunsForward.segment_forward

    def spied(self, q_, *args, **kwargs):
        seen.add(q_.dtype)
        return original(self, q_, *args, **kwargs)

    monkeypatch.setattr(runs.RunsForward, "segment_forward", spied)
    report = check_kernel(kernel, spec, q, k, v, inputs)
    assert report.ok, str(report)
    assert segment_backward["n"] == 1
    native = dtype == "bfloat16" and runs.NATIVE_BF16
    assert seen == {torch.bfloat16 if native else torch.float32}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_types_on_one_whole_call(dtype):
    """ALiBi causal (a key-form bias: one fused call over all keys, ``WholeCall``): out and lse,
    then q, k, v gradients (the slopes held fixed) by the conformance rule."""
    spec = _spec("examples/alibi.yaml")
    kernel = attncc.compile(spec, backend="torch", config={"use_sdpa": True, "block_m": 16,
                                                           "block_n": 16})
    q, k, v, inputs = random_inputs(spec, 2, 70, 70, dtype, seed=6, library="torch",
                                    head_dim=16, value_dim=16)
    report = check_kernel(kernel, spec, q, k, v, inputs, grads=False)
    assert report.ok, str(report)
    _check_grads(kernel, spec, q, k, v, inputs)


KEEP = {"keep": {"shape": ["batch", "seq_k"], "dtype": "bool"}}
WHOLE_CASES = {
    "causal_padding": {"attncc": 1, "name": "causal_padding", "heads": 4, "kv_heads": 2,
                       "mask": "kv_idx <= q_idx and keep[b, kv_idx]", "inputs": KEEP},
    "padding_key_bias": {"attncc": 1, "name": "padding_key_bias", "score_mod": "score + 0.05 "
                         "* kv_idx - 0.1 * q_idx", "mask": "keep[b, kv_idx]", "inputs": KEEP},
}


@pytest.fixture
def whole_calls(monkeypatch):
    """Counts ``WholeCall`` calls; the tile loop and the segment loop fail the test."""
    counter = {"n": 0}
    original = runs_grad.WholeCall.apply

    def counted(*args):
        counter["n"] += 1
        return original(*args)

    def refused(*args, **kwargs):
        raise AssertionError("another path ran instead of one whole call")

    monkeypatch.setattr(runs_grad.WholeCall, "apply", counted)
    monkeypatch.setattr(FlashAttention, "apply", refused)
    monkeypatch.setattr(runs.RunsForward, "segment_forward", refused)
    return counter


@pytest.mark.parametrize("name", list(WHOLE_CASES))
def test_key_form_masks_take_one_whole_call(name, whole_calls):
    """Padding read per key (beside a causal term, or with a key-form bias): one fused call
    over all keys, forward and backward. Batch entry 1 is left-padded (causal: its first rows
    see no key) or, without the causal term, keeps no key at all: zeros, lse -inf, no
    gradient there."""
    spec = _spec(WHOLE_CASES[name])
    causal = name == "causal_padding"
    kernel = attncc.compile(spec, backend="torch", config={"use_sdpa": True, "block_m": 16,
                                                           "block_n": 16})
    q, k, v, _ = random_inputs(spec, 2, 45, 45, "float32", seed=7, library="torch",
                               head_dim=16, value_dim=16)
    keep = torch.ones(2, 45, dtype=torch.bool)
    keep[0, 5::4] = False
    keep[1, :10] = False
    if not causal:
        keep[1] = False
    dead = slice(0, 10) if causal else slice(None)
    report = check_kernel(kernel, spec, q, k, v, {"keep": keep})
    assert report.ok, str(report)
    _check_grads(kernel, spec, q, k, v, {"keep": keep})
    out, lse = kernel(q, k, v, return_lse=True, keep=keep)
    assert torch.all(out[1, :, dead] == 0) and torch.all(lse[1, :, dead] == float("-inf"))
    assert torch.isfinite(out).all() and torch.isfinite(lse[0]).all()
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    kernel(*leaves, keep=keep).square().sum().backward()
    dq = leaves[0].grad
    assert torch.all(dq[1, :, dead] == 0)
    assert all(torch.isfinite(x.grad).all() for x in leaves)
    assert whole_calls["n"] >= 4


def test_more_queries_than_keys_with_an_entry_keeping_none(whole_calls):
    """Causal padding, 40 queries against 24 keys: the fully padded entry's every row (also
    those past the last key) has lse -inf."""
    spec = _spec(WHOLE_CASES["causal_padding"])
    kernel = attncc.compile(spec, backend="torch")
    q, k, v, _ = random_inputs(spec, 2, 40, 24, "float32", seed=1, library="torch",
                               head_dim=16, value_dim=16)
    keep = torch.ones(2, 24, dtype=torch.bool)
    keep[1] = False
    report = check_kernel(kernel, spec, q, k, v, {"keep": keep}, grads=False)
    assert report.ok, str(report)
    out, lse = kernel(q, k, v, return_lse=True, keep=keep)
    assert torch.all(lse[1] == float("-inf")) and torch.all(out[1] == 0)
    assert whole_calls["n"] >= 1


def test_inputs_without_unit_stride_in_the_head_dimension(segment_backward):
    """The fused kernels assume unit stride in the last dimension; q, k, v that are views
    without it (x.mT.contiguous().mT) give the reference's output and gradients."""
    spec = _spec(GQA_WINDOW)
    kernel = attncc.compile(spec, backend="torch", config={"use_sdpa": True, "block_m": 16,
                                                           "block_n": 16})
    q, k, v, inputs = random_inputs(spec, 2, 50, 50, "float32", seed=9, library="torch",
                                    head_dim=16, value_dim=16)
    q, k, v = (x.mT.contiguous().mT for x in (q, k, v))
    assert q.stride(-1) != 1
    report = check_kernel(kernel, spec, q, k, v, inputs, grads=False)
    assert report.ok, str(report)
    _check_grads(kernel, spec, q, k, v, inputs)
    assert segment_backward["n"] == 1


CAUSAL_DOCS = {"attncc": 1, "name": "causal_docs", "heads": 4, "kv_heads": 2,
               "mask": "kv_idx <= q_idx and doc[b, q_idx] == doc[b, kv_idx]",
               "inputs": {"doc": {"shape": ["batch", "seq_q"], "dtype": "int32"}}}
PREFIX_ALIBI = {"attncc": 1, "name": "prefix_alibi", "mask": "kv_idx <= q_idx or kv_idx < 20",
                "score_mod": "score - slope[h] * (q_idx - kv_idx)",
                "inputs": {"slope": {"shape": ["heads"], "dtype": "float32"}}}
#: (spec, triangles served by one causal call each): a diagonal shifted off the tril, and
#: holes left of the diagonal, make one call per query block instead
STAIRS = {
    "prefix_lm": ("examples/prefix_lm.yaml", True),
    "causal_docs": (CAUSAL_DOCS, True),
    "prefix_alibi": (PREFIX_ALIBI, True),
    "shifted_diagonal": ({"attncc": 1, "name": "shifted", "mask": "kv_idx <= q_idx + 3 or "
                          "kv_idx < 20"}, False),
    "holes": ({"attncc": 1, "name": "holes", "mask": "(kv_idx <= q_idx and (q_idx - kv_idx) % "
               "40 != 7) or kv_idx < 20"}, False),
}


@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (16, 32)], ids=str)
@pytest.mark.parametrize("name", list(STAIRS))
def test_staircases_take_one_causal_call_per_triangle(name, blocks, segment_backward,
                                                       monkeypatch):
    """Runs growing by one query block per block (causal beside a prefix or within documents)
    are one top-left causal call over the segment's rows where the plan and the mask show an
    exact triangle, else one call per block; both train like the reference."""
    source, causal = STAIRS[name]
    spec = _spec(source)
    made = []
    init = runs.RunsForward.__init__

    def capture(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(runs.RunsForward, "__init__", capture)
    kernel = attncc.compile(spec, backend="torch", config={"use_sdpa": True,
                                                           "block_m": blocks[0],
                                                           "block_n": blocks[1]})
    q, k, v, inputs = random_inputs(spec, 2, 128, 128, "float32", seed=7, library="torch",
                                    head_dim=16, value_dim=16)
    if "prefix" in inputs:  # one inside a block, one at a block's end
        inputs["prefix"] = torch.tensor([21, 48], dtype=torch.int32)
    if "doc" in inputs:  # documents of 70 and 100 rows: boundaries inside blocks
        inputs["doc"] = (torch.arange(128)[None].expand(2, -1) // torch.tensor([[70], [100]]))
        inputs["doc"] = inputs["doc"].to(torch.int32)
    _check_grads(kernel, spec, q, k, v, inputs)
    tall = [c for r in made for cs in r.calls for c in cs if c.causal]
    assert bool(tall) == (causal and blocks[0] % blocks[1] == 0)
    assert all(c.seg.count == 1 and c.seg.rows > blocks[0] for c in tall)


@pytest.mark.parametrize("blocks", [(16, 32), (32, 16)], ids=str)
@pytest.mark.parametrize("mask", ["kv_idx <= q_idx + seq_k - seq_q", "kv_idx + 16 <= q_idx",
                                  "kv_idx + 16 <= q_idx or kv_idx < 3"])
@pytest.mark.parametrize("seq_q, seq_k", [(32, 48), (64, 48), (96, 77)])
def test_runs_whose_lengths_grow_off_the_block_grid(mask, blocks, seq_q, seq_k, count_calls):
    """Key runs clipped at seq_k, or diagonals off the key-block grid, can grow by one query
    block's rows without being a triangle: they stay one call per block."""
    spec = _spec({"attncc": 1, "name": "lagged", "mask": mask})
    calls = count_calls(runs.RunsForward)
    kernel = attncc.compile(spec, backend="torch", config={"use_sdpa": True,
                                                           "block_m": blocks[0],
                                                           "block_n": blocks[1]})
    q, k, v, inputs = random_inputs(spec, 1, seq_q, seq_k, "float32", seed=3, library="torch",
                                    heads=2, head_dim=16, value_dim=16)
    report = check_kernel(kernel, spec, q, k, v, inputs)
    assert report.ok, str(report)
    assert calls["n"] >= 1
