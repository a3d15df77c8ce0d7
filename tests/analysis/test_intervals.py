"""Interval reasoning: soundness on random masks (hypothesis), exactness on the common masks."""

from __future__ import annotations

import numpy as np
import pytest
import sympy
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import attncc
from attncc.analysis.intervals import ALWAYS, MAYBE, NEVER, classify, classify_checked, interval
from attncc.plan import EMPTY, FULL, PARTIAL, build_plan
from attncc.spec.numeric import evaluate
from attncc.spec.symbols import kv_idx, q_idx

DOC = {"doc": {"shape": ["batch", "seq_q + seq_k"], "dtype": "int32"}}


def dense_mask(spec, sizes, inputs, exact=False):
    """The mask evaluated element by element, (batch, heads, seq_q, seq_k) booleans; ``exact``
    evaluates on Python integers (object arrays), which never overflow."""
    shape = (sizes["batch"], sizes["heads"], sizes["seq_q"], sizes["seq_k"])
    env = {**sizes, **inputs}
    for axis, name in enumerate(("b", "h", "q_idx", "kv_idx")):
        view = [1, 1, 1, 1]
        view[axis] = shape[axis]
        env[name] = np.arange(shape[axis], dtype=np.int64).reshape(view)
        if exact:
            env[name] = env[name].astype(object)
    with np.errstate(all="ignore"):
        value = evaluate(spec.mask, env, np)
    return np.broadcast_to(np.asarray(value, dtype=bool), shape)


def block_truth(dense, bm, bn):
    """Per block: (every element true, some element true), over (batch, heads, nQ, nK)."""
    starts_q = np.arange(0, dense.shape[2], bm)
    starts_k = np.arange(0, dense.shape[3], bn)
    every = np.logical_and.reduceat(np.logical_and.reduceat(dense, starts_q, 2), starts_k, 3)
    some = np.logical_or.reduceat(np.logical_or.reduceat(dense, starts_q, 2), starts_k, 3)
    return every, some


def plan_and_truth(mask, sizes, bm, bn, inputs=None, constants=None):
    spec = attncc.load_spec({"attncc": 1, "mask": mask, "constants": constants or {},
                             "inputs": DOC if "doc[" in mask else {}})
    every, some = block_truth(dense_mask(spec, sizes, inputs or {}), bm, bn)
    plan = build_plan(spec, sizes, bm, bn, inputs)
    states = np.broadcast_to(plan.states, every.shape)
    return states, every, some


# -- random masks -------------------------------------------------------------------------------
LEAVES = st.sampled_from(["q_idx", "kv_idx", "b", "h", "seq_q", "seq_k", "doc[b, q_idx]",
                          "doc[b, kv_idx]", "0", "1", "2", "3", "5", "-4"])
DIVISORS = st.sampled_from(["2", "3", "4", "-3", "7"])


def numbers(children):
    binary = st.sampled_from(["+", "-", "*"])
    return st.one_of(
        st.tuples(children, binary, children).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(children, st.sampled_from(["//", "%", "/"]), DIVISORS).map(
            lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(st.sampled_from(["min", "max"]), children, children).map(
            lambda t: f"{t[0]}({t[1]}, {t[2]})"),
        st.tuples(st.sampled_from(["abs", "sqrt", "log", "exp", "tanh", "sigmoid", "floor",
                                   "ceil"]), children).map(lambda t: f"{t[0]}({t[1]})"),
        st.tuples(children, conditions(LEAVES), children).map(
            lambda t: f"({t[0]} if {t[1]} else {t[2]})"),
        children.map(lambda c: f"({c}) ** 2"),
    )


def conditions(num):
    compare = st.sampled_from(["<", "<=", "==", "!=", ">", ">="])
    return st.tuples(num, compare, num).map(lambda t: f"({t[0]} {t[1]} {t[2]})")


NUMBERS = st.recursive(LEAVES, numbers, max_leaves=6)


def boolean(children):
    return st.one_of(
        st.tuples(children, st.sampled_from(["and", "or"]), children).map(
            lambda t: f"({t[0]} {t[1]} {t[2]})"),
        children.map(lambda c: f"(not {c})"),
        st.tuples(conditions(NUMBERS), children, children).map(
            lambda t: f"where({t[0]}, {t[1]}, {t[2]})"),
    )


MASKS = st.recursive(conditions(NUMBERS), boolean, max_leaves=4)


@st.composite
def problems(draw):
    sizes = {"batch": draw(st.integers(1, 2)), "heads": draw(st.integers(1, 3)),
             "seq_q": draw(st.integers(1, 19)), "seq_k": draw(st.integers(1, 19)),
             "kv_heads": 1, "head_dim": 4, "value_dim": 4}
    length = sizes["seq_q"] + sizes["seq_k"]
    doc = np.array(draw(st.lists(st.integers(-3, 5), min_size=sizes["batch"] * length,
                                 max_size=sizes["batch"] * length)), dtype=np.int32)
    doc = doc.reshape(sizes["batch"], length)
    if draw(st.booleans()):
        doc = np.sort(doc, axis=1)
    return draw(MASKS), sizes, draw(st.integers(1, 8)), draw(st.integers(1, 8)), doc


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_random_masks_are_never_misclassified(problem):
    assert_sound(*problem)


def assert_sound(mask, sizes, bm, bn, doc):
    """The plan of ``mask`` has no FULL block with a false element, no EMPTY with a true one
    (masks the evaluator rejects are skipped)."""
    try:
        spec = attncc.load_spec({"attncc": 1, "mask": mask,
                                 "inputs": DOC if "doc[" in mask else {}})
        dense_mask(spec, sizes, {"doc": doc})
    except attncc.SpecError:  # e.g. log of a number <= 0 after simplification
        assume(False)
    except (TypeError, ValueError, OverflowError):  # the evaluator rejects sympy's E and I
        assume(False)  # (sqrt of a negative) and folds scalars with math (log(-1), exp(1000))
    states, every, some = plan_and_truth(mask, sizes, bm, bn, {"doc": doc})
    assert np.all(every[states == FULL]), f"FULL block with a false element: {mask}"
    assert not np.any(some[states == EMPTY]), f"EMPTY block with a true element: {mask}"


COMPUTED_READS = ["doc[b, q_idx // 2]", "doc[b, (q_idx + kv_idx) // 3]",
                  "doc[b, abs(q_idx - kv_idx)]", "doc[b, kv_idx % 4]", "doc[b, q_idx - kv_idx]",
                  "doc[b, min(q_idx, 3)]", "doc[b, doc[b, kv_idx] % 2]",
                  "doc[b, q_idx if kv_idx < 3 else kv_idx // 2]"]
COMPUTED_NUMBERS = st.recursive(st.one_of(LEAVES, st.sampled_from(COMPUTED_READS)), numbers,
                                max_leaves=4)
COMPUTED_MASKS = st.recursive(conditions(COMPUTED_NUMBERS), boolean, max_leaves=3)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), COMPUTED_MASKS)
def test_inputs_read_at_computed_indices_are_never_misclassified(problem, mask):
    """Per-block bounds of ``doc[b, q_idx // 2]`` and the like (ranges of each index's interval,
    negative indices wrapping, nested reads): never a wrong FULL or EMPTY."""
    _, sizes, bm, bn, doc = problem
    assert_sound(mask, sizes, bm, bn, doc)


def test_computed_block_indices_are_classified_per_block():
    """BigBird's random blocks, read at ``q_idx // 4``: the plan is as tight as the elements."""
    rand = {"rand": {"shape": ["seq_q // 4", "seq_k // 4"], "dtype": "bool"}}
    spec = attncc.load_spec({"attncc": 1, "mask": "rand[q_idx // 4, kv_idx // 4] or "
                                                   "kv_idx == q_idx", "inputs": rand})
    table = np.random.default_rng(1).random((16, 16)) < 0.3
    sizes = {"batch": 1, "heads": 1, "seq_q": 64, "seq_k": 64}
    for bm, bn in ((4, 4), (8, 4), (4, 12), (16, 16), (5, 7)):
        every, some = block_truth(dense_mask(spec, sizes, {"rand": table}), bm, bn)
        states = np.broadcast_to(build_plan(spec, sizes, bm, bn, {"rand": table}).states,
                                 every.shape)
        assert np.all(every[states == FULL]) and not np.any(some[states == EMPTY])
        assert np.array_equal(states == FULL, every), (bm, bn)
        assert np.array_equal(states == EMPTY, ~some), (bm, bn)


# -- exactness on the common masks -------------------------------------------------------------
EXACT = {
    "causal": "kv_idx <= q_idx",
    "bottom_right_causal": "kv_idx <= q_idx + seq_k - seq_q",
    "sliding_window": "kv_idx <= q_idx and q_idx - kv_idx < window",
    "symmetric_window": "abs(q_idx - kv_idx) <= window",
    "prefix_lm": "kv_idx < prefix or kv_idx <= q_idx",
    "document": "doc[b, q_idx] == doc[b, kv_idx]",
    "causal_document": "doc[b, q_idx] == doc[b, kv_idx] and kv_idx <= q_idx",
}


@pytest.mark.parametrize("name", sorted(EXACT))
@pytest.mark.parametrize(("seq_q", "seq_k", "bm", "bn"),
                         [(64, 64, 8, 8), (61, 61, 8, 8), (50, 70, 16, 8), (37, 37, 4, 16),
                          (40, 40, 1, 1)])
def test_common_masks_are_classified_exactly(name, seq_q, seq_k, bm, bn):
    sizes = {"batch": 2, "heads": 1, "seq_q": seq_q, "seq_k": seq_k}
    inputs = None
    if "doc" in EXACT[name]:
        rng = np.random.default_rng(seq_q * 1000 + seq_k)
        inputs = {"doc": np.sort(rng.integers(0, 6, (2, seq_q + seq_k)), axis=1)}
        if "causal" in name and seq_q != seq_k:
            pytest.skip("a conjunction is exact only where its parts share witnesses; for "
                        "causal documents that needs aligned queries and keys")
    states, every, some = plan_and_truth(EXACT[name], sizes, bm, bn, inputs,
                                         {"window": 9, "prefix": 13})
    expected = np.where(every, FULL, np.where(some, PARTIAL, EMPTY))
    np.testing.assert_array_equal(states, expected)


# -- the interval engine directly --------------------------------------------------------------
x = sympy.Symbol("x", integer=True)
y = sympy.Symbol("y", integer=True)


def boxes(x_lo, x_hi, y_lo=0, y_hi=0):
    return {"x": (np.array(x_lo), np.array(x_hi)), "y": (np.array(y_lo), np.array(y_hi))}


def test_mod_is_exact_without_wrap_and_conservative_with_it():
    lo, hi = interval(sympy.Mod(x, 8), boxes([9, 6, 3, -3], [12, 10, 30, -1]))
    np.testing.assert_array_equal(lo, [1, 0, 0, 5])
    np.testing.assert_array_equal(hi, [4, 7, 7, 7])


def test_floor_division_and_ceiling_use_integer_arithmetic():
    box = boxes([0, 7, -5], [6, 20, -1])
    np.testing.assert_array_equal(interval(sympy.floor(x / 3), box)[0], [0, 2, -2])
    np.testing.assert_array_equal(interval(sympy.ceiling(x / 3), box)[1], [2, 7, 0])


def test_abs_min_max_and_products_follow_signs():
    box = boxes([-3, 2], [4, 5], [-2, -7], [-1, -6])
    np.testing.assert_array_equal(interval(sympy.Abs(x), box)[0], [0, 2])
    np.testing.assert_array_equal(interval(sympy.Abs(y), box)[0], [1, 6])
    lo, hi = interval(x * y, box)
    np.testing.assert_array_equal(lo, [-8, -35])
    np.testing.assert_array_equal(hi, [6, -12])
    lo, hi = interval(sympy.Min(x, y) + sympy.Max(x, 0), box)
    np.testing.assert_array_equal(lo, [-3, -5])
    np.testing.assert_array_equal(hi, [3, -1])


def test_piecewise_takes_the_decided_branch_and_unites_otherwise():
    expr = sympy.Piecewise((x, x > 5), (y, True))
    lo, hi = interval(expr, boxes([6, 0, 3], [9, 2, 8], [20, 20, 20], [30, 30, 30]))
    np.testing.assert_array_equal(lo, [6, 20, 3])
    np.testing.assert_array_equal(hi, [9, 30, 30])


def test_comparisons_with_possible_nan_stay_undecided():
    cond = sympy.log(x - 3) < 100
    assert classify(cond, boxes([0, 5], [10, 10])).tolist() == [MAYBE, ALWAYS]
    assert classify(sympy.Not(cond), boxes([0, 5], [10, 10])).tolist() == [MAYBE, NEVER]
    assert classify(sympy.sqrt(x) > -1, boxes([-1, 0], [4, 4])).tolist() == [MAYBE, ALWAYS]


def test_integer_reasoning_tightens_strict_relations():
    assert classify(x < y, boxes(0, 4, 5, 9)) == ALWAYS
    assert classify(sympy.Eq(x, y), boxes(3, 3, 3, 3)) == ALWAYS
    assert classify(sympy.Eq(x, y), boxes(3, 4, 3, 4)) == MAYBE
    assert classify(sympy.Ne(x, y), boxes(3, 4, 5, 6)) == ALWAYS
    # (x + 1) / 2 > y has rational coefficients; it is decided on 2 y < x + 1, exactly
    assert classify((x + 1) / 2 > y, boxes(5, 5, 2, 2)) == ALWAYS
    assert classify((x + 1) / 2 > y, boxes(5, 5, 3, 3)) == NEVER


def test_index_symbols_broadcast_into_block_pairs():
    box = {"q_idx": (np.array([[0], [4]]), np.array([[3], [7]])),
           "kv_idx": (np.array([[0, 4]]), np.array([[3, 7]]))}
    np.testing.assert_array_equal(classify(kv_idx <= q_idx, box), [[MAYBE, NEVER],
                                                                   [ALWAYS, MAYBE]])


# -- integers past int64 -------------------------------------------------------------------------
#: Four terms of up to 4.0e18 each: every term fits int64, their sum (1.5e19) does not.
SUM4 = " + ".join(f"{2 ** 40}*(q_idx + {i})**3" for i in range(1, 5)) + f" <= kv_idx + {2 ** 40}"


@pytest.mark.parametrize(("mask", "seq_q", "seq_k", "bm", "bn"), [
    # q_idx**4 * 2**40 passes int64 from q_idx 46 on: decided there by the other side of `or`
    ("kv_idx <= q_idx or (q_idx >= 48 and q_idx**4 * 2**40 < kv_idx)", 200, 16, 16, 8),
    (f"q_idx < 64 and {SUM4}", 150, 8, 16, 8),
    ("where(q_idx < 40, q_idx**4 * 2**40 > kv_idx * 2**58, kv_idx < 4)", 120, 12, 8, 4),
    ("q_idx**8 > 10**18 or kv_idx < 3", 300, 10, 32, 5),
])
def test_overflowing_masks_are_planned_like_exact_integers(mask, seq_q, seq_k, bm, bn):
    spec = attncc.load_spec({"attncc": 1, "mask": mask})
    sizes = {"batch": 1, "heads": 1, "seq_q": seq_q, "seq_k": seq_k}
    every, some = block_truth(dense_mask(spec, sizes, {}, exact=True), bm, bn)
    states = np.broadcast_to(build_plan(spec, sizes, bm, bn).states, every.shape)
    assert np.all(every[states == FULL]) and not np.any(some[states == EMPTY])
    assert np.any(states == EMPTY) or np.any(states == FULL)  # not a trivially PARTIAL plan


def test_a_sum_past_int64_is_planned_exactly_not_wrapped_into_full_blocks():
    """int64 wraps the sum negative from q_idx ~ 130 on; the plan once called those blocks FULL.
    The exact mask is false everywhere: every block is EMPTY, and no kernel evaluates it."""
    spec = attncc.load_spec({"attncc": 1, "mask": SUM4})
    sizes = {"batch": 1, "heads": 1, "seq_q": 150, "seq_k": 8}
    assert not dense_mask(spec, sizes, {}, exact=True).any()
    assert (build_plan(spec, sizes, 16, 8).states == EMPTY).all()


@pytest.mark.parametrize(("mask", "seq"), [
    ("(q_idx - kv_idx)**2 * 10**18 <= 4 * 10**18", 64),
    ("q_idx**4 % 7 == kv_idx % 7", 131072),
    ("q_idx * 10**30 >= kv_idx", 131072),  # 10**30 * q_idx for q_idx >= 1 in the first block
    ("q_idx + 10**30 <= kv_idx + 10**30", 64),
])
def test_blocks_a_kernel_would_evaluate_past_int64_are_refused(mask, seq):
    spec = attncc.load_spec({"attncc": 1, "mask": mask})
    block = 16 if seq < 1000 else 128
    with pytest.raises(attncc.InputError, match=r"past the .* that 64-bit integers hold"):
        build_plan(spec, {"seq_q": seq, "seq_k": seq}, block, block)


@pytest.mark.parametrize(("mask", "partial"), [
    ("q_idx**4 >= kv_idx", 1024),  # the first query block (q_idx**4 < kv_idx for q_idx <= 18)
    ("q_idx**4 + 10**30 >= kv_idx", 0),
])
def test_overflow_decided_without_evaluation_plans_at_long_sequences(mask, partial):
    """Past int64 only where the float bounds decide the block (FULL): nothing to refuse."""
    spec = attncc.load_spec({"attncc": 1, "mask": mask})
    plan = build_plan(spec, {"seq_q": 131072, "seq_k": 131072}, 128, 128)
    assert plan.counts() == {"FULL": 1024 * 1024 - partial, "PARTIAL": partial, "EMPTY": 0}


def test_overflow_is_unknown_per_box_and_exact_elsewhere():
    expr = x ** 4 * 2 ** 40
    lo, hi = interval(expr, boxes([0, 10, 40, 50], [9, 20, 50, 60]))
    np.testing.assert_array_equal(lo[:2], [0, 10 ** 4 * 2 ** 40])
    assert hi[1] == 20 ** 4 * 2 ** 40  # exact below the limit, a float bound past it:
    assert lo[2] <= 40 ** 4 * 2 ** 40 <= 50 ** 4 * 2 ** 40 <= hi[2] < 1.001 * 50 ** 4 * 2 ** 40
    found = classify_checked(expr > y, boxes([0, 10, 40, 50], [9, 20, 50, 60], 0, 5))
    assert found.states.tolist() == [MAYBE, ALWAYS, ALWAYS, ALWAYS]
    assert found.overflow.tolist() == [False, False, True, True] and found.worst[1] > 2 ** 63
    small = classify_checked(x * 3 > y, boxes([0, 10], [9, 20], 0, 5))
    assert small.overflow is False and small.worst is None
    # |int64 min| wraps in int64 abs: a leaf at the bottom of int64 must not come out negative
    leaf = sympy.IndexedBase("t", integer=True)[x]
    low = (np.array([-2 ** 63]), np.array([-2 ** 63 + 5]))
    assert classify(sympy.Abs(leaf) > 2 ** 62, boxes(0, 0), {leaf: low}).tolist() == [ALWAYS]


BIG_LEAVES = st.sampled_from(["q_idx", "kv_idx", "seq_q", "1", "3", "-4", "2**40", "3**35",
                              "-(2**61)", "10**19"])
BIG_NUMBERS = st.recursive(BIG_LEAVES, lambda c: st.tuples(c, st.sampled_from(["+", "-", "*"]), c)
                           .map(lambda t: f"({t[0]} {t[1]} {t[2]})")
                           | st.tuples(c, st.sampled_from(["//", "%"]), DIVISORS)
                           .map(lambda t: f"({t[0]} {t[1]} {t[2]})")
                           | c.map(lambda x: f"abs({x})") | c.map(lambda x: f"({x}) ** 3"),
                           max_leaves=5)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.tuples(BIG_NUMBERS, st.sampled_from(["<", "<=", "==", ">"]), BIG_NUMBERS),
       st.integers(1, 40), st.integers(1, 12), st.integers(1, 8), st.integers(1, 4))
def test_masks_past_int64_are_never_misclassified_against_exact_integers(rel, seq_q, seq_k,
                                                                         bm, bn):
    """Large constants: the plan agrees with exact integer arithmetic, or refuses (InputError)
    where a kernel would have to evaluate past int64; it never wraps."""
    try:
        spec = attncc.load_spec({"attncc": 1, "mask": " ".join(rel)})
    except attncc.SpecError:
        assume(False)
    assume(not isinstance(spec.mask, sympy.logic.boolalg.BooleanAtom))
    sizes = {"batch": 1, "heads": 1, "seq_q": seq_q, "seq_k": seq_k}
    every, some = block_truth(dense_mask(spec, sizes, {}, exact=True), bm, bn)
    try:
        states = np.broadcast_to(build_plan(spec, sizes, bm, bn).states, every.shape)
    except attncc.InputError as err:
        assert "64-bit integers" in str(err)
        return
    assert np.all(every[states == FULL]), f"FULL block with a false element: {spec.mask}"
    assert not np.any(some[states == EMPTY]), f"EMPTY block with a true element: {spec.mask}"
