"""The torch backend's flex path (flex.py): FlexAttention's compiled CPU forward for score_mods
the fused SDPA calls cannot take, over attncc's block plan, against the float64 reference.

Each compile costs seconds, so the cases are few and each covers several points: ragged sizes
(not multiples of the 128-blocks), seq_q != seq_k, grouped heads, masks and score_mods that read
inputs (whose new values must not recompile), and rows with no kept key.
"""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.ir.graph import attention_node
from attncc.passes.pipeline import lower
from attncc.testing import random_inputs
from attncc_torch import flex

GEMMA = {"attncc": 1, "name": "gemma_local", "heads": 4, "kv_heads": 2,
         "score_mod": "30.0 * tanh(score / 30.0)",
         "mask": "kv_idx <= q_idx and q_idx - kv_idx < 100"}
SCALED_DOCS = {"attncc": 1, "name": "scaled_docs",
               "score_mod": "score * slope[h] + 0.5 * sigmoid(score)",
               "mask": "doc[b, q_idx] == doc[b, kv_idx] and kv_idx < q_idx",
               "inputs": {"slope": {"shape": ["heads"], "dtype": "float32"},
                          "doc": {"shape": ["batch", "seq_q"], "dtype": "int64"}}}


@pytest.fixture
def calls(count_calls):
    return count_calls(flex.FlexRunner)


def _ref(spec, q, k, v, inputs):
    wide = {n: x.double() if x.is_floating_point() else x for n, x in inputs.items()}
    return torch.as_tensor(attncc.reference(spec, q.double(), k.double(), v.double(), **wide))


def test_the_strategy_offers_flex_only_for_non_additive_score_mods():
    paths = {}
    for source in ("examples/softcap.toml", "examples/alibi.yaml", "examples/causal.yaml", GEMMA):
        spec = attncc.load_spec(source)
        _, node = attention_node(lower(spec))
        paths[spec.name] = node.lowering.allows("flex")
    assert paths == {"softcap": True, "alibi": False, "causal": False, "gemma_local": True}


@pytest.mark.parametrize("seq_q, seq_k", [(200, 200), (130, 333)])
def test_softcap_window_with_grouped_heads(seq_q, seq_k, calls):
    spec = attncc.load_spec({**GEMMA, "mask": "kv_idx <= q_idx + seq_k - seq_q and "
                                              "q_idx + seq_k - seq_q - kv_idx < 100"})
    kernel = attncc.compile(spec, backend="torch")
    q, k, v, inputs = random_inputs(spec, 2, seq_q, seq_k, "float32", seed=seq_k,
                                    library="torch", head_dim=32, value_dim=32)
    with torch.no_grad():
        out = kernel(q, k, v, **inputs)
    assert calls["n"] == 1, "the flex path was not taken"
    assert (out.double() - _ref(spec, q, k, v, inputs)).abs().max() < 2e-5


def test_inputs_change_without_a_recompile_and_empty_rows_are_zero(calls):
    spec = attncc.load_spec(SCALED_DOCS)
    kernel = attncc.compile(spec, backend="torch", config={"use_sdpa": True})
    for seed in (1, 2):
        q, k, v, inputs = random_inputs(spec, 2, 150, 150, "float32", seed=seed,
                                        library="torch", heads=3, head_dim=16, value_dim=16)
        ids = torch.randint(0, 3 + seed, (2, 150), generator=torch.Generator().manual_seed(seed))
        inputs["doc"] = torch.sort(ids, dim=-1)[0]
        with torch.no_grad():
            out = kernel(q, k, v, **inputs)
        ref = _ref(spec, q, k, v, inputs)
        assert (out.double() - ref).abs().max() < 2e-5
        # the first query of each document sees no key (kv_idx < q_idx): its row is 0
        first = torch.nonzero(torch.diff(inputs["doc"][0], prepend=torch.tensor([-1])))[:, 0]
        assert torch.all(out[0, :, first] == 0)
    assert calls["n"] == 2
    assert len(kernel._flex._compiled) == 1  # one call shape: new inputs did not recompile


def test_gradients_lse_and_decoding_take_the_tile_loop(calls):
    spec = attncc.load_spec("examples/softcap.toml")
    kernel = attncc.compile(spec, backend="torch")
    q, k, v, _ = random_inputs(spec, 1, 140, 140, "float32", seed=3, library="torch",
                               heads=2, head_dim=16, value_dim=16)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    kernel(*leaves).sum().backward()
    kernel(q, k, v, return_lse=True)
    kernel(q[:, :, :1], k, v)
    assert calls["n"] == 0
    assert all(x.grad is not None for x in leaves)


def test_the_printed_module_reads_as_torch_code():
    spec = attncc.load_spec(SCALED_DOCS)
    _, node = attention_node(lower(spec))
    text = flex._module_text(node, {"batch": 1, "heads": 3, "kv_heads": 3, "seq_q": 150,
                                    "seq_k": 150, "head_dim": 16, "value_dim": 16},
                             ("doc", "slope"))
    assert "def score_mod(score, b, h, q_idx, kv_idx):" in text
    assert "torch.sigmoid(score)" in text and "slope[h]" in text
    assert "doc[b, q_idx]" in text and "BlockMask.from_kv_blocks(" in text
    compile(text, "<flex>", "exec")


def test_an_unprintable_score_mod_is_left_to_the_tile_loop():
    spec = attncc.load_spec({"attncc": 1, "name": "bits",
                             "score_mod": "score * ((q_idx ^ kv_idx) & 1)"})
    _, node = attention_node(lower(spec))
    assert flex.printable(node) is not None


def test_a_traced_call_never_compiles_flex():
    """Fake tensors (a model being compiled) take another path: no nested torch.compile."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(1, 2, 256, 16)
    assert flex._tracing(q)
    assert not flex._tracing(torch.empty(1, 2, 256, 16))


def test_floor_divided_block_indices_print_as_integer_indices(calls):
    """BigBird's ``rb[q_idx // 64, kv_idx // 64]`` beside a soft-cap: the printed mask_mod
    indexes with integer floor division, so FlexAttention compiles it (no fallback warning)."""
    import warnings

    spec = attncc.load_spec({"attncc": 1, "name": "bigbird_softcap", "heads": 2,
                             "score_mod": "30.0 * tanh(score / 30.0)",
                             "mask": "rb[q_idx // 64, kv_idx // 64] or abs(q_idx - kv_idx) <= 16",
                             "inputs": {"rb": {"shape": ["seq_q // 64", "seq_k // 64"],
                                               "dtype": "bool"}}})
    kernel = attncc.compile(spec, backend="torch")
    q, k, v, _ = random_inputs(spec, 1, 256, 256, "float32", seed=4, library="torch",
                               head_dim=16, value_dim=16)
    rb = torch.rand(4, 4, generator=torch.Generator().manual_seed(5)) < 0.4
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with torch.no_grad():
            out = kernel(q, k, v, rb=rb)
    assert (out.double() - _ref(spec, q, k, v, {"rb": rb})).abs().max() < 2e-5
    assert calls["n"] == 1
