"""The torch backend's decode path (decode.py): a few query rows against many keys in one pass,
for specs no fused call takes (soft-capping, Gemma-2), judged against the float64 reference by the
conformance rule (``attncc.testing.accuracy.check_kernel``: out, lse and gradients, score_mod
inputs included). Every test asserts the path taken: decode runs, the tile loop does not.
"""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.ir.graph import attention_node
from attncc.passes.pipeline import lower
from attncc.reference import attend
from attncc.testing import random_inputs
from attncc.testing.accuracy import check_kernel
from attncc_torch import decode
from attncc_torch.flash import FlashAttention

TAIL = "kv_idx <= q_idx + seq_k - seq_q"
GEMMA_LOCAL = {"attncc": 1, "name": "gemma_local", "heads": 4, "kv_heads": 2,
               "score_mod": "30.0 * tanh(score / 30.0)",
               "mask": f"{TAIL} and q_idx + seq_k - seq_q - kv_idx < 40"}
GEMMA_GLOBAL = {**GEMMA_LOCAL, "name": "gemma_global", "mask": TAIL}
SCALED = {"attncc": 1, "name": "scaled_slopes", "heads": 4, "kv_heads": 1,
          "score_mod": "score * slope[h] + 0.5 * sigmoid(score) - 0.01 * (q_idx - kv_idx)",
          "mask": "kv_idx < q_idx + seq_k - seq_q and doc[b, kv_idx] == doc[b, q_idx + seq_k "
                  "- seq_q]",
          "inputs": {"slope": {"shape": ["heads"], "dtype": "float32"},
                     "doc": {"shape": ["batch", "seq_k"], "dtype": "int64"}}}


@pytest.fixture
def decoded(monkeypatch, count_calls):
    """Counts decode calls; the tile loop fails the test if it runs."""
    counter = count_calls(decode.DecodeRunner)

    def refused(*args, **kwargs):
        raise AssertionError("the tile loop ran instead of the decode path")

    monkeypatch.setattr(FlashAttention, "apply", refused)
    return counter


def test_the_strategy_offers_decode_for_dot_softmax_specs():
    paths = {}
    for source in ("examples/softcap.toml", "examples/alibi.yaml", "examples/sigmoid.yaml",
                   "examples/memory_tokens.yaml", GEMMA_LOCAL):
        spec = attncc.load_spec(source)
        _, node = attention_node(lower(spec))
        paths[spec.name] = node.lowering.allows("decode")
    assert paths == {"softcap": True, "alibi": True, "sigmoid": False, "memory_tokens": False,
                     "gemma_local": True}
    kernel = attncc.compile(GEMMA_LOCAL, backend="torch")
    assert "# path decode (" in kernel.source


@pytest.mark.parametrize("spec", [GEMMA_LOCAL, GEMMA_GLOBAL], ids=["local", "global"])
@pytest.mark.parametrize("seq_q, seq_k", [(1, 300), (4, 77), (16, 129)])
def test_softcapped_decoding_steps(spec, seq_q, seq_k, decoded):
    kernel = attncc.compile(spec, backend="torch")
    q, k, v, inputs = random_inputs(spec, 2, seq_q, seq_k, "float32", seed=seq_q,
                                    library="torch", head_dim=32)
    report = check_kernel(kernel, spec, q, k, v, inputs)
    assert report.ok, str(report)
    assert decoded["n"] >= 2  # the forward check and the gradient run


def test_inputs_in_score_mod_and_mask_with_empty_rows(decoded):
    """A score_mod reading a learnable input and the indices, a mask reading document ids, one
    query head per kv head group of 4; the rows of batch 1 see no key of their document."""
    kernel = attncc.compile(SCALED, backend="torch")
    q, k, v, inputs = random_inputs(SCALED, 2, 3, 50, "float32", seed=1, library="torch",
                                    head_dim=16)
    doc = torch.zeros(2, 50, dtype=torch.int64)
    doc[0, 25:] = 1
    doc[1, 47:] = torch.tensor([3, 4, 5])  # each query row alone in its document
    inputs = {**inputs, "doc": doc}
    report = check_kernel(kernel, SCALED, q, k, v, inputs)
    assert report.ok, str(report)
    out, lse = kernel(q, k, v, return_lse=True, **inputs)
    assert torch.isfinite(out).all() and torch.isfinite(lse[0]).all()
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))
    assert decoded["n"] >= 3


def test_more_rows_take_another_path(monkeypatch):
    spec = attncc.load_spec(GEMMA_LOCAL)
    kernel = attncc.compile(spec, backend="torch")
    q, k, v, _ = random_inputs(spec, 1, decode.MAX_ROWS + 1, 64, "float32", seed=2,
                               library="torch", head_dim=16)

    def refused(*args, **kwargs):
        raise AssertionError("the decode path ran for more than MAX_ROWS query rows")

    monkeypatch.setattr(decode.DecodeRunner, "__call__", refused)
    kernel(q, k, v)


ALIBI_CACHE = {"attncc": 1, "name": "alibi_cache", "heads": 8, "kv_heads": 2,
               "score_mod": "score - slope[h] * (q_idx + seq_k - seq_q - kv_idx)",
               "mask": TAIL, "inputs": {"slope": {"shape": ["heads"], "dtype": "float32"}}}
PADDED = {"attncc": 1, "name": "padded_cache", "heads": 4, "kv_heads": 1,
          "mask": f"{TAIL} and keep[b, kv_idx]",
          "inputs": {"keep": {"shape": ["batch", "seq_k"], "dtype": "bool"}}}


@pytest.fixture
def fused_calls(monkeypatch, count_calls):
    """Counts torch's scaled_dot_product_attention calls; the tile loop fails the test."""
    counter = {"n": 0}
    original = torch.nn.functional.scaled_dot_product_attention

    def counted(*args, **kwargs):
        counter["n"] += 1
        return original(*args, **kwargs)

    def refused(*args, **kwargs):
        raise AssertionError("the tile loop ran instead of the decode path")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    monkeypatch.setattr(FlashAttention, "apply", refused)
    counter["decode"] = count_calls(decode.DecodeRunner)
    return counter


def _out_only(kernel):
    """The kernel as check_kernel calls it, the output from a call without return_lse (the
    fused SDPA call) and the lse from one with it."""
    def call(q, k, v, return_lse=False, **inputs):
        out = kernel(q, k, v, **inputs)
        return (out, kernel(q, k, v, return_lse=True, **inputs)[1]) if return_lse else out

    return call


@pytest.mark.parametrize("seq_q, seq_k", [(1, 300), (5, 77)])
def test_an_additive_bias_decodes_in_one_fused_call(seq_q, seq_k, fused_calls):
    """ALiBi against a KV cache: the bias (and -inf where the mask drops) is SDPA's float mask;
    with a learnable slope the same call gives its gradient."""
    kernel = attncc.compile(ALIBI_CACHE, backend="torch")
    q, k, v, inputs = random_inputs(ALIBI_CACHE, 2, seq_q, seq_k, "float32", seed=seq_q,
                                    library="torch", head_dim=32)
    with torch.no_grad():
        report = check_kernel(_out_only(kernel), ALIBI_CACHE, q, k, v, inputs, grads=False)
    assert report.ok, str(report)
    assert fused_calls["n"] >= 1 and fused_calls["decode"]["n"] >= 2
    slope = inputs["slope"].clone().requires_grad_()
    calls = fused_calls["n"]
    kernel(q, k, v, slope=slope).square().sum().backward()
    assert fused_calls["n"] == calls + 1 and slope.grad is not None
    ref_slope = inputs["slope"].double().clone().requires_grad_()
    qd, kd, vd = (x.double() for x in (q, k, v))
    pos = torch.arange(seq_q)[:, None] + seq_k - seq_q
    s = (qd @ kd.repeat_interleave(4, 1).mT) * 32 ** -0.5
    s = s - ref_slope[:, None, None] * (pos - torch.arange(seq_k))
    s = s.masked_fill(torch.arange(seq_k) > pos, float("-inf"))
    (torch.softmax(s, -1) @ vd.repeat_interleave(4, 1)).square().sum().backward()
    assert torch.allclose(slope.grad.double(), ref_slope.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("seq_q", [1, 3])
def test_padding_and_empty_rows_in_one_fused_call(seq_q, fused_calls):
    """A padding input read per call: the second batch entry keeps no key at all (its rows
    give zeros, lse -inf); the first has holes."""
    kernel = attncc.compile(PADDED, backend="torch")
    q, k, v, inputs = random_inputs(PADDED, 2, seq_q, 40, "float32", seed=3, library="torch",
                                    head_dim=16)
    keep = torch.ones(2, 40, dtype=torch.bool)
    keep[0, ::3] = False
    keep[1] = False
    inputs = {**inputs, "keep": keep}
    with torch.no_grad():
        report = check_kernel(_out_only(kernel), PADDED, q, k, v, inputs, grads=False)
        out, lse = kernel(q, k, v, return_lse=True, **inputs)
        fast = kernel(q, k, v, **inputs)
    assert report.ok, str(report)
    assert torch.all(fast[1] == 0) and torch.all(lse[1] == float("-inf"))
    assert torch.isfinite(fast[0]).all() and torch.equal(fast[1], out[1])
    assert fused_calls["n"] >= 2


@pytest.mark.parametrize("seq_q", [1, 2])
def test_static_terms_beside_a_bottom_right_causal_mask(seq_q, fused_calls):
    """A single decoding row sees every key of the causal term, but not of the other terms
    (keys before 3 and odd keys dropped), and a row of two sees the causal term too."""
    spec = {**PADDED, "name": "strided_cache", "mask": f"{TAIL} and kv_idx >= 3 and "
            "kv_idx % 2 == 0", "inputs": {}}
    kernel = attncc.compile(spec, backend="torch")
    q, k, v, _ = random_inputs(spec, 2, seq_q, 50, "float32", seed=4, library="torch",
                               head_dim=16)
    with torch.no_grad():
        report = check_kernel(_out_only(kernel), spec, q, k, v, {}, grads=False)
    assert report.ok, str(report)
    assert fused_calls["n"] >= 1 and fused_calls["decode"]["n"] >= 2


@pytest.mark.parametrize("mask, inputs", [
    (f"{TAIL} and flag[0]", {"flag": {"shape": [1], "dtype": "bool"}}),
    (f"{TAIL} and seq_k >= 50", {}),
], ids=["input", "sizes"])
def test_a_term_that_reads_no_index_can_drop_every_key(mask, inputs):
    """For one query row the causal term is left out: what remains reads no index (a 0-d
    tile); where it is false every row is empty (zeros, lse -inf)."""
    spec = {"attncc": 1, "name": "flagged", "heads": 4, "kv_heads": 2, "mask": mask,
            "inputs": inputs}
    kernel = attncc.compile(spec, backend="torch")
    q, k, v, ins = random_inputs(spec, 2, 1, 40, "float32", seed=5, library="torch",
                                 head_dim=16)
    ins = {n: torch.tensor([False]) for n in ins}
    with torch.no_grad():
        out, lse = kernel(q, k, v, return_lse=True, **ins)
        fast = kernel(q, k, v, **ins)
    assert torch.all(out == 0) and torch.all(fast == 0) and torch.all(lse == float("-inf"))


def test_a_call_under_inference_mode_leaves_later_training_calls_working():
    """The decode path caches index tensors; made under inference_mode they must still serve a
    later call whose learnable slope saves them for backward."""
    kernel = attncc.compile(ALIBI_CACHE, backend="torch")
    q, k, v, inputs = random_inputs(ALIBI_CACHE, 2, 1, 40, "float32", seed=6,
                                    library="torch", head_dim=16)
    with torch.inference_mode():
        kernel(q, k, v, **inputs)
    slope = inputs["slope"].clone().requires_grad_()
    kernel(q, k, v, slope=slope).sum().backward()
    assert slope.grad is not None and torch.isfinite(slope.grad).all()


@pytest.mark.parametrize("read, shape, dtype", [
    ("keep[b, kv_idx]", ["batch", "seq_k"], "bool"),
    ("hm[h, kv_idx]", ["heads", "seq_k"], "bool"),        # query heads split (Hkv, G)
    ("ids[b, kv_idx] != 0", ["batch", "seq_k"], "int64"),  # not a bool read: evaluated
], ids=["batch", "heads", "int"])
def test_input_terms_read_per_head_batch_and_dtype(read, shape, dtype, fused_calls):
    name = read.split("[")[0]
    spec = {"attncc": 1, "name": f"read_{name}", "heads": 6, "kv_heads": 2,
            "mask": f"{TAIL} and {read}", "inputs": {name: {"shape": shape, "dtype": dtype}}}
    kernel = attncc.compile(spec, backend="torch")
    q, k, v, _ = random_inputs(spec, 2, 1, 30, "float32", seed=8, library="torch",
                               head_dim=16)
    gen = torch.Generator().manual_seed(9)
    table = torch.rand(2 if shape[0] == "batch" else 6, 30, generator=gen) < 0.6
    table[1, :] = False  # batch entry / head 1 keeps nothing
    table = table if dtype == "bool" else table.long() * 7
    with torch.no_grad():
        report = check_kernel(_out_only(kernel), spec, q, k, v, {name: table}, grads=False)
    assert report.ok, str(report)
    assert fused_calls["n"] >= 1


def test_the_cached_tail_mask_serves_training_after_inference_mode():
    """The sdpa path's bottom-right mask buffer is cached; made under inference_mode it must
    still serve a later call that saves it for backward."""
    spec = {"attncc": 1, "name": "tail_cache", "mask": TAIL}
    kernel = attncc.compile(spec, backend="torch")
    q, k, v, _ = random_inputs(spec, 1, 8, 100, "float32", seed=2, library="torch",
                               head_dim=16)
    with torch.inference_mode():
        kernel(q, k, v)
    leaf = q.clone().requires_grad_()
    kernel(leaf, k, v).sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


def test_a_padding_read_reaches_sdpa_without_a_copy(monkeypatch):
    """One decoding row under a bottom-right causal mask and padding ``keep[b, kv_idx]``: SDPA
    gets the padding input itself as its mask (a reshaped view, nothing evaluated or copied)."""
    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kwargs):
        seen.append(attn_mask)
        return original(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    kernel = attncc.compile(PADDED, backend="torch")
    q, k, v, _ = random_inputs(PADDED, 2, 1, 40, "float32", seed=3, library="torch",
                               head_dim=16)
    keep = torch.ones(2, 40, dtype=torch.bool)
    keep[:, :5] = False
    with torch.no_grad():
        out = kernel(q, k, v, keep=keep)
    assert len(seen) == 1 and seen[0].data_ptr() == keep.data_ptr()
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("spec", [ALIBI_CACHE, GEMMA_LOCAL, SCALED],
                         ids=["alibi", "softcap_window", "inputs"])
def test_half_decoding_steps_read_the_cache_as_given(spec, dtype, decoded, monkeypatch):
    """A decoding step in float16/bfloat16 on the CPU reaches the decode path with q, k and v
    in their dtype (an upcast would copy the whole cache per step); right by the conformance
    rule, with and without a gradient."""
    given = []
    call = decode.DecodeRunner.__call__

    def spy(self, c, k, v, return_lse):
        given.append((c.q.dtype, k.dtype, v.dtype))
        return call(self, c, k, v, return_lse)

    monkeypatch.setattr(decode.DecodeRunner, "__call__", spy)
    kernel = attncc.compile(spec, backend="torch")
    q, k, v, inputs = random_inputs(spec, 2, 3, 150, dtype, seed=9, library="torch",
                                    head_dim=32)
    report = check_kernel(kernel, spec, q, k, v, inputs)
    assert report.ok, str(report)
    half = getattr(torch, dtype)
    assert given and all(d == (half,) * 3 for d in given)


def test_a_large_bias_keeps_its_precision_in_a_half_decoding_step():
    """BLOOM's ALiBi form ``slope[h] * kv_idx`` reaches 1e3 at 2k keys: rounded to bfloat16 as
    it stands (SDPA takes a float mask in q's dtype) its steps are 8 apart; shifted by its row
    maximum first, the keys that carry the weight stay exact."""
    spec = {"attncc": 1, "name": "bloom", "heads": 4, "kv_heads": 4,
            "score_mod": "score + slope[h] * kv_idx", "mask": TAIL,
            "inputs": {"slope": {"shape": ["heads"], "dtype": "float32"}}}
    kernel = attncc.compile(spec, backend="torch")
    q, k, v, inputs = random_inputs(spec, 1, 4, 2048, "bfloat16", seed=3, library="torch",
                                    head_dim=32)
    inputs["slope"] = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    ref = attend(spec, q.double(), k.double(), v.double(), {"slope": inputs["slope"].double()})
    assert float((kernel(q, k, v, **inputs).double() - ref).abs().max()) < 0.02
