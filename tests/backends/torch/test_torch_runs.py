"""The torch backend's run-based CPU forward (runs.py) against the float64 reference.

The shared conformance suite uses grouped-query heads, where this path does not apply; here every
example spec it serves runs with equal query and kv heads, odd sizes, batch-dependent masks
(key padding), input-reading masks (documents, BigBird tables) and rows with no kept key.
"""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.ir.graph import attention_node
from attncc.passes.pipeline import lower
from attncc.reference import attend
from attncc.testing import check_kernel, example_specs, random_inputs
from attncc_torch import runs


def _served(spec) -> bool:
    _, node = attention_node(lower(spec))
    return node.lowering.allows("runs") and spec.kv_heads in (None, spec.heads)


SPECS = [p for p in example_specs() if _served(attncc.load_spec(p))]


@pytest.fixture
def calls(count_calls):
    return count_calls(runs.RunsForward)


def test_the_runs_path_serves_masked_specs():
    names = {p.stem for p in SPECS}
    assert {"sliding_window", "document_mask", "longformer", "bigbird", "key_padding", "alibi",
            "relative_bias"} <= names


@pytest.mark.parametrize("seq", [64, 77])
@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_runs_forward_matches_the_reference(path, seq, calls):
    spec = attncc.load_spec(path)
    kernel = attncc.compile(spec, backend="torch", config={"use_sdpa": True, "block_m": 16,
                                                           "block_n": 16})
    q, k, v, inputs = random_inputs(spec, 2, seq, seq, "float32", seed=seq, library="torch",
                                    heads=3, head_dim=16, value_dim=16)
    report = check_kernel(kernel, spec, q, k, v, inputs, grads=False)
    assert report.ok, str(report)
    if (spec.mask is not None and not spec.is_causal) or spec.score_mod is not None:
        assert calls["n"] >= 1, "the runs path was not taken"


def test_rows_with_no_kept_key_give_zero_and_minus_infinity(calls):
    spec = attncc.load_spec({"attncc": 1, "name": "pad", "mask": "kv_idx < lengths[b]",
                             "inputs": {"lengths": {"shape": ["batch"], "dtype": "int64"}}})
    kernel = attncc.compile(spec, backend="torch", config={"use_sdpa": True, "block_m": 16,
                                                           "block_n": 16})
    q = torch.randn(2, 3, 40, 8)
    lengths = torch.tensor([0, 17])
    out, lse = kernel(q, q, q, lengths=lengths, return_lse=True)
    assert calls["n"] >= 1
    assert torch.all(out[0] == 0) and torch.all(lse[0] == -torch.inf)
    ref = attncc.reference(spec, q, q, q, lengths=lengths)
    assert abs(out.double().numpy() - ref).max() < 1e-5


ALIBI_WINDOW = {"attncc": 1, "name": "alibi_window", "heads": 4, "kv_heads": 2,
                "score_mod": "score - slope[h] * (q_idx - kv_idx) + 0.25 * q_idx",
                "mask": "kv_idx <= q_idx and q_idx - kv_idx < 24",
                "inputs": {"slope": {"shape": ["heads"], "dtype": "float32"}}}
SYM_ALIBI = {**ALIBI_WINDOW, "name": "sym_alibi", "mask": None,
             "score_mod": "score - slope[h] * abs(q_idx - kv_idx)"}
HF_BIAS = {"attncc": 1, "name": "hf_bias", "heads": 4, "kv_heads": 2, "mask": "kv_idx <= q_idx",
           "score_mod": "score + hb[b, q_idx, kv_idx]",
           "inputs": {"hb": {"shape": ["batch", "seq_q", "seq_k"], "dtype": "float32"}}}


@pytest.mark.parametrize("source", [ALIBI_WINDOW, SYM_ALIBI, HF_BIAS, "examples/alibi.yaml"],
                         ids=["alibi_window", "sym_alibi", "hf_bias", "alibi"])
def test_additive_bias_enters_the_fused_calls(source, calls):
    """Key-form (ALiBi, with a row term) and general (|q - kv|, a per-batch tensor) biases, GQA,
    with return_lse; new input values on a second call are used (no stale bias tile)."""
    spec = attncc.load_spec({k: v for k, v in source.items() if v is not None}
                            if isinstance(source, dict) else source)
    kernel = attncc.compile(spec, backend="torch", config={"use_sdpa": True, "block_m": 16,
                                                           "block_n": 16})
    for seed in (1, 2):
        q, k, v, inputs = random_inputs(spec, 2, 53, 53, "float64", seed=seed, library="torch",
                                        head_dim=8, value_dim=8)
        report = check_kernel(kernel, spec, q, k, v, inputs, grads=False)
        assert report.ok, str(report)
        out, lse = kernel(q, k, v, return_lse=True, **inputs)
        want_out, want_lse = attncc.compile(spec, backend="torch", config={"use_sdpa": False})(
            q, k, v, return_lse=True, **inputs)
        torch.testing.assert_close(out, want_out)
        torch.testing.assert_close(lse, want_lse)
    assert calls["n"] >= 4


@pytest.mark.parametrize("source", ["examples/alibi.yaml", "examples/relative_bias.yaml",
                                    SYM_ALIBI], ids=["alibi", "relative_bias", "sym_alibi"])
def test_whole_bias_call_trains_through_the_fused_backward(source, calls):
    """Key-form (ALiBi causal) and Toeplitz biases with fixed inputs: q, k, v gradients (GQA:
    kv-head shapes) from the fused backward, against float64 autograd of the reference; a bias
    input that needs a gradient takes the exact tile path (its gradient included)."""
    spec = attncc.load_spec({k: v for k, v in source.items() if v is not None}
                            if isinstance(source, dict) else source)
    kernel = attncc.compile(spec, backend="torch")
    q, k, v, inputs = random_inputs(spec, 2, 45, 45, "float32", seed=4, library="torch",
                                    head_dim=8, value_dim=8)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    kernel(*leaves, **inputs).pow(2).sum().backward()
    assert calls["n"] == 1
    ref = [x.double().requires_grad_() for x in (q, k, v)]
    wide = {n: x.double() if x.is_floating_point() else x for n, x in inputs.items()}
    attend(spec, *ref, wide).pow(2).sum().backward()
    for got, want in zip(leaves, ref, strict=True):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=1e-4, rtol=1e-4)
    name = next(n for n, x in inputs.items() if x.is_floating_point())
    learned = {**inputs, name: inputs[name].clone().requires_grad_()}
    kernel(q, k, v, **learned).pow(2).sum().backward()
    assert calls["n"] == 1 and learned[name].grad is not None
