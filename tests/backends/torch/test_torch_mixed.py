"""Half types where the device has fast half matmuls (``mixed.py``; CUDA, stood in for here by
the CPU through ``MIXED_DEVICES``): q, k and v reach the tile loop and the dense decoding pass in
their own dtype, the score products take half operands and return float32, and forward,
backward and lse are right by the conformance rule (DESIGN §8) on every softmax, sigmoid and
top-k example spec, with GQA, score mods, memory tokens and a learnable bias.
"""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.ir.graph import attention_node
from attncc.passes.pipeline import lower
from attncc.reference import attend
from attncc.testing import check_kernel, example_specs, random_inputs
from attncc_torch import mixed
from attncc_torch.flash import FlashAttention


def _tiles(spec) -> bool:
    """Whether the tile loop serves ``spec`` (not linear, Nyström or a Linformer projection,
    which compute in float32)."""
    _, node = attention_node(lower(spec))
    return node.lowering.allows("tiles") and node.projection is None


SPECS = [p for p in example_specs() if _tiles(attncc.load_spec(p))]


@pytest.fixture
def products(monkeypatch):
    """The CPU computes half types mixed; records the operand dtypes of each product and
    checks its result is float32."""
    monkeypatch.setattr(mixed, "MIXED_DEVICES", {"cpu"})
    seen = []
    original = mixed.Mixed.__call__

    def spy(self, a, b):
        out = original(self, a, b)
        assert out.dtype == torch.float32
        seen.append((a.dtype, b.dtype))
        return out

    monkeypatch.setattr(mixed.Mixed, "__call__", spy)
    return seen


def test_the_tile_loop_serves_every_kind_of_spec():
    names = {p.stem for p in SPECS}
    assert {"causal", "alibi", "softcap", "topk", "sigmoid", "memory_tokens", "gqa",
            "relative_bias", "attention_sinks"} <= names


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_half_types_compute_mixed_in_the_tile_loop(path, dtype, products, monkeypatch):
    spec = attncc.load_spec(path)
    kernel = attncc.compile(spec, backend="torch", config={"use_sdpa": False, "block_m": 16,
                                                           "block_n": 16})
    given = []
    apply = FlashAttention.apply

    def spy(pb, names, q5, k4, v4, *tensors):
        given.append((q5.dtype, k4.dtype, v4.dtype))
        return apply(pb, names, q5, k4, v4, *tensors)

    monkeypatch.setattr(FlashAttention, "apply", spy)
    q, k, v, inputs = random_inputs(spec, 2, 40, 40, dtype, seed=11, library="torch",
                                    heads=4, head_dim=16, value_dim=16)
    report = check_kernel(kernel, spec, q, k, v, inputs)
    assert report.ok, str(report)
    half = getattr(torch, dtype)
    assert given and all(d == (half,) * 3 for d in given)
    if attention_node(lower(spec))[1].score == "dot":
        assert (half, half) in products  # the score product: q and k as given
    assert (torch.float32, half) in products  # weights times values


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_learnable_bias_trains_mixed(dtype, products):
    """ALiBi slopes that need a gradient: the tile's autograd graph through the half product."""
    spec = attncc.load_spec("examples/alibi.yaml")
    kernel = attncc.compile(spec, backend="torch", config={"use_sdpa": False, "block_m": 16,
                                                           "block_n": 16})
    q, k, v, inputs = random_inputs(spec, 1, 33, 33, dtype, seed=2, library="torch",
                                    heads=4, head_dim=16, value_dim=16)
    slope = inputs["slope"].float().requires_grad_()
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    kernel(*leaves, slope=slope).float().square().sum().backward()
    ref = [x.detach().double().requires_grad_() for x in (q, k, v, slope)]
    attend(spec, *ref[:3], {"slope": ref[3]}).square().sum().backward()
    err = (slope.grad.double() - ref[3].grad).abs().max() / ref[3].grad.abs().max()
    assert float(err) < (2e-2 if dtype == "bfloat16" else 3e-3)
    assert (getattr(torch, dtype),) * 2 in products


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_decoding_with_a_soft_cap_computes_mixed(dtype, products):
    """The dense decoding pass (a non-additive score_mod): a few query rows against the keys."""
    spec = attncc.load_spec("examples/softcap.toml")
    kernel = attncc.compile(spec, backend="torch")
    q, k, v, inputs = random_inputs(spec, 2, 3, 300, dtype, seed=4, library="torch",
                                    heads=4, head_dim=16, value_dim=16)
    report = check_kernel(kernel, spec, q, k, v, inputs, grads=False)
    assert report.ok, str(report)
    assert (getattr(torch, dtype),) * 2 in products
