"""The block plan's tables and API, the masks pass, and plans at long sequence lengths."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import sympy

import attncc
from attncc.errors import InputError
from attncc.ir.build import build
from attncc.ir.graph import Mask, op
from attncc.passes.masks import Masks
from attncc.plan import CONTENT_CAP, EMPTY, FULL, PARTIAL, PlanCache, build_plan, fused_node
from attncc.spec.symbols import kv_idx, q_idx

DOC_INPUT = {"doc": {"shape": ["batch", "seq_q"], "dtype": "int64"}}


def spec(mask=None, **extra):
    return attncc.load_spec({"attncc": 1, "mask": mask, **extra})


def sizes(seq_q, seq_k=None, batch=1, heads=1):
    return {"batch": batch, "heads": heads, "seq_q": seq_q, "seq_k": seq_k or seq_q}


def test_causal_at_131072_with_128_blocks():
    plan = build_plan(spec("kv_idx <= q_idx"), sizes(131072), 128, 128)
    n = 1024
    assert plan.states.shape == (1, 1, n, n)
    assert plan.counts() == {"FULL": n * (n - 1) // 2, "PARTIAL": n, "EMPTY": n * (n - 1) // 2}
    np.testing.assert_array_equal(plan.full_counts[0, 0], np.arange(n))
    np.testing.assert_array_equal(plan.partial_index[0, 0, :, 0], np.arange(n))


def test_sliding_window_at_131072_with_128_blocks():
    window = 1024  # 8 blocks: 7 FULL below the diagonal, PARTIAL on it and 8 below
    plan = build_plan(spec("kv_idx <= q_idx and q_idx - kv_idx < window",
                           constants={"window": window}), sizes(131072), 128, 128)
    n = 1024
    assert plan.counts()["FULL"] == sum(min(m, 7) for m in range(n))
    assert plan.counts()["PARTIAL"] == n + (n - 8)
    assert plan.partial_counts.max() == 2


def test_index_tables_and_transposes_list_blocks_in_order():
    mask = "doc[b, q_idx] == doc[b, kv_idx] and kv_idx <= q_idx"
    doc = np.sort(np.random.default_rng(0).integers(0, 5, (2, 100)), axis=1)
    plan = build_plan(spec(mask, inputs=DOC_INPUT), sizes(100, batch=2), 16, 8, {"doc": doc})
    assert plan.states.shape == (2, 1, 7, 13)
    for state, counts, index, axis in (
            (FULL, plan.full_counts, plan.full_index, 3),
            (PARTIAL, plan.partial_counts, plan.partial_index, 3),
            (FULL, plan.full_counts_t, plan.full_index_t, 2),
            (PARTIAL, plan.partial_counts_t, plan.partial_index_t, 2)):
        chosen = plan.states == state
        if axis == 2:
            chosen = np.swapaxes(chosen, 2, 3)
        np.testing.assert_array_equal(counts, chosen.sum(-1))
        assert counts.dtype == np.int32 and index.dtype == np.int32
        for b, h, row in np.ndindex(*counts.shape):
            expected = np.flatnonzero(chosen[b, h, row])
            np.testing.assert_array_equal(index[b, h, row, :counts[b, h, row]], expected)


def test_kv_blocks_broadcast_over_shared_axes():
    plan = build_plan(spec("kv_idx <= q_idx"), sizes(64, batch=3, heads=4), 16, 16)
    assert plan.states.shape == (1, 1, 4, 4)
    full, partial = plan.kv_blocks(2, 3, 2)
    np.testing.assert_array_equal(full, [0, 1])
    np.testing.assert_array_equal(partial, [2])


def test_head_dependent_mask_has_one_plan_per_head():
    mask = "kv_idx <= q_idx or h == 0"
    plan = build_plan(spec(mask), sizes(32, heads=3, batch=2), 8, 8)
    assert plan.states.shape == (1, 3, 4, 4)
    assert np.all(plan.states[0, 0] == FULL)
    assert plan.kv_blocks(1, 2, 1)[1].tolist() == [1]


def test_no_mask_is_all_full_and_partial_last_blocks_are_clipped():
    plan = build_plan(spec(), sizes(100, 37), 32, 16)
    assert plan.states.shape == (1, 1, 4, 3)
    assert np.all(plan.states == FULL)
    assert plan.block_density() == 1.0


def test_block_density_weighs_blocks_by_their_area():
    plan = build_plan(spec("kv_idx <= q_idx"), sizes(10), 4, 4)
    # blocks of rows 4,4,2 and cols 4,4,2; non-empty: the lower triangle with the diagonal
    rows, cols = np.array([4, 4, 2]), np.array([4, 4, 2])
    kept = np.tril(np.ones((3, 3)))
    assert plan.block_density() == pytest.approx(rows @ kept @ cols / 100)


def test_bottom_right_alignment_with_seq_q_different_from_seq_k():
    plan = build_plan(spec("kv_idx <= q_idx + seq_k - seq_q"), sizes(4, 12), 4, 4)
    np.testing.assert_array_equal(plan.states[0, 0, 0], [FULL, FULL, PARTIAL])


def test_linformer_plans_over_rank_keys():
    s = spec(lowrank={"method": "linformer", "rank": 20})
    plan = build_plan(s, sizes(64, 256), 16, 8)
    assert (plan.seq_k, plan.states.shape) == (20, (1, 1, 4, 3))
    node = fused_node(s)
    assert node.projection == 20
    assert build_plan(node, {"seq_q": 64}, 16, 8).seq_k == 20  # the key count is the node's


def test_plans_come_from_the_node_not_the_spec():
    """The plan reads the fused node's mask and annotations: a node rewritten by a pass plans
    as rewritten."""
    node = fused_node(spec("kv_idx <= q_idx"))
    band = dataclasses.replace(node.mask, expr=sympy.Le(sympy.Abs(q_idx - kv_idx), 3))
    plan = build_plan(dataclasses.replace(node, mask=band), sizes(32), 8, 8)
    assert plan.counts() == {"FULL": 0, "PARTIAL": 10, "EMPTY": 6}
    with pytest.raises(InputError, match="LinearAttention node has no block plan"):
        build_plan(spec("kv_idx <= q_idx", normalize="linear", feature_map="elu1"),
                   sizes(32), 8, 8)


def test_plan_cache_keys_by_sizes_and_input_content():
    s = spec("doc[b, q_idx] == doc[b, kv_idx]", inputs=DOC_INPUT)
    cache = PlanCache(fused_node(s), 8, 8, size=2)
    doc = np.repeat(np.arange(4), 8)[None]
    first = cache.get({**sizes(32), "head_dim": 64}, {"doc": doc})
    assert cache.get(sizes(32), {"doc": doc.copy()}) is first  # equal content, unused size
    other = cache.get(sizes(32), {"doc": np.zeros_like(doc)})
    assert other is not first and not np.array_equal(other.states, first.states)
    assert cache.get(sizes(32), {"doc": doc.astype(np.int32)}) is not first  # dtype counts
    assert cache.get(sizes(32), {"doc": doc}) is not first  # evicted: two plans at most
    big = np.zeros((1, (CONTENT_CAP // 8) + 1), dtype=np.int64)
    huge = {"batch": 1, "heads": 1, "seq_q": big.shape[1], "seq_k": big.shape[1]}
    wide = PlanCache(fused_node(s), 4096, 4096)
    assert wide.get(huge, {"doc": big}) is not wide.get(huge, {"doc": big})  # not cached
    with pytest.raises(InputError, match="reads the input"):
        cache.get(sizes(32))


@pytest.mark.parametrize("dtype", ["bool", "int64"])
def test_plan_cache_keys_large_inputs_by_a_digest_of_their_content(dtype):
    # past 64 KiB the key is a digest: equal content hits, one changed element misses
    mask = "m[q_idx, kv_idx]" if dtype == "bool" else "m[q_idx, kv_idx] != 0"
    s = spec(mask, inputs={"m": {"shape": ["seq_q", "seq_k"], "dtype": dtype}})
    cache = PlanCache(fused_node(s), 64, 64)
    m = np.tril(np.ones((512, 512), dtype=dtype))
    first = cache.get(sizes(512), {"m": m})
    assert cache.get(sizes(512), {"m": m.copy()}) is first
    assert cache.get(sizes(512), {"m": np.asfortranarray(m)}) is first  # layout does not count
    changed = m.copy()
    changed[0, 511] = 1
    other = cache.get(sizes(512), {"m": changed})
    assert other is not first and other.states[0, 0, 0, -1] != first.states[0, 0, 0, -1]


def test_plan_cache_of_an_index_only_mask_shares_the_global_plans():
    node = fused_node(spec("kv_idx <= q_idx"))
    cache = PlanCache(node, 16, 16)
    plan = cache.get(sizes(64, batch=2, heads=3))
    assert cache.get(sizes(64)) is plan  # batch and heads do not change this plan
    assert PlanCache(node, 16, 16).get(sizes(64)) is plan
    assert build_plan(node, sizes(64), 16, 16) is plan
    with pytest.raises(InputError, match="block_n"):
        PlanCache(node, 16, 0)


def test_index_only_plans_are_cached_and_read_only():
    s = spec("kv_idx <= q_idx")
    first = build_plan(s, sizes(256), 64, 64)
    assert build_plan(spec("kv_idx <= q_idx"), sizes(256), 64, 64) is first
    assert build_plan(s, sizes(256), 32, 64) is not first
    with pytest.raises(ValueError):
        first.states[0, 0, 0, 0] = EMPTY


def test_inputs_may_be_torch_tensors():
    torch = pytest.importorskip("torch")
    doc = np.repeat(np.arange(4), 8)[None]
    s = spec("doc[b, q_idx] == doc[b, kv_idx]", inputs=DOC_INPUT)
    from_numpy = build_plan(s, sizes(32), 8, 8, {"doc": doc})
    from_torch = build_plan(s, sizes(32), 8, 8, {"doc": torch.from_numpy(doc)})
    np.testing.assert_array_equal(from_numpy.states, from_torch.states)
    np.testing.assert_array_equal(from_numpy.states[0, 0], np.eye(4) * FULL)
    limit = spec("kv_idx <= q_idx + lim[h]", inputs={"lim": {"shape": ["heads"],
                                                              "dtype": "bfloat16"}})
    lim = torch.tensor([0.0, 3.0], dtype=torch.bfloat16)  # NumPy has no bfloat16: as float32
    half, wide = (build_plan(limit, sizes(32, heads=2), 8, 8, {"lim": x})
                  for x in (lim, lim.float()))
    np.testing.assert_array_equal(half.states, wide.states)


def test_missing_input_and_bad_arguments_raise_input_errors():
    s = spec("doc[b, q_idx] == doc[b, kv_idx]", inputs=DOC_INPUT)
    with pytest.raises(InputError, match="reads the input"):
        build_plan(s, sizes(32), 8, 8)
    with pytest.raises(InputError, match="indexed by kv_idx"):
        build_plan(s, sizes(32, 40), 8, 8, {"doc": np.zeros((1, 32), dtype=np.int64)})
    with pytest.raises(InputError, match="block_m"):
        build_plan(spec("kv_idx <= q_idx"), sizes(32), 0, 8)
    with pytest.raises(InputError, match="seq_k"):
        build_plan(spec("kv_idx <= q_idx"), {"seq_q": 8}, 8, 8)


def test_repr_summarizes_counts():
    text = repr(build_plan(spec("kv_idx <= q_idx"), sizes(64), 16, 16))
    assert "states=(1, 1, 4, 4)" in text and "FULL=6" in text and "PARTIAL=4" in text


def test_masks_pass_records_inputs_and_axes():
    s = spec("doc[b, q_idx] == doc[b, kv_idx] and (h > 0 or kv_idx <= q_idx)",
             inputs=DOC_INPUT)
    graph = build(s)
    result = Masks().apply(graph)
    masks = [op(result, n) for n in result if isinstance(op(result, n), Mask)]
    assert [(m.reads_inputs, m.varies_with) for m in masks] == [(("doc",), ("b", "h"))]
    before = [op(graph, n) for n in graph if isinstance(op(graph, n), Mask)]
    assert before[0].reads_inputs == ()  # the input graph is untouched
    assert result.graph["passes"][-1] == "masks"


def test_masks_pass_on_index_only_and_maskless_specs():
    result = Masks().apply(build(spec("kv_idx <= q_idx")))
    mask = next(op(result, n) for n in result if isinstance(op(result, n), Mask))
    assert (mask.reads_inputs, mask.varies_with) == ((), ())
    plain = build(spec())
    after = Masks().apply(plain)
    assert after is not plain
    assert {n: op(after, n) for n in after} == {n: op(plain, n) for n in plain}
