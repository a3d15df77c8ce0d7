"""Interval rules of the spec language 1.1 functions: every block the plan calls FULL or EMPTY
is so element by element (soundness), and the rules are tight enough to skip blocks."""

from __future__ import annotations

import numpy as np
import pytest

import attncc
from attncc.plan import EMPTY, FULL, build_plan
from attncc.spec.numeric import evaluate

MASKS = [
    "sin(q_idx / 7) + cos(kv_idx / 5) > 0.5",
    "tan(kv_idx / 40) < 1",
    "erf((q_idx - kv_idx) / 16) >= 0",
    "sign(q_idx - kv_idx) >= 0",
    "round((q_idx - kv_idx) / 8) <= 0",
    "2 ** (-(q_idx - kv_idx) / 16) > 0.25",
    "pow(0.5, kv_idx / 8) < 0.1",
    "clamp(q_idx - kv_idx, 0, 20) < 10",
    "(q_idx & 7) == (kv_idx & 7)",
    "(q_idx | kv_idx) < 40",
    "(q_idx ^ kv_idx) < 16",
    "(q_idx >> 4) == (kv_idx >> 4)",
    "(kv_idx << 1) <= q_idx",
    "(q_idx > 30) == (kv_idx > 30)",
    "(q_idx > 30) != (kv_idx < 10)",
    "(q_idx > 30) ^ (kv_idx < 10)",
    "gelu((q_idx - kv_idx) / 8) > 0.5 or silu(kv_idx / 9.0) > 3",
    "gelu_tanh(q_idx / 10 - 3) < 1",
    "exp2(log2(kv_idx + 1)) <= q_idx + 1",
]


def dense(spec, nq, nk):
    env = {"b": np.zeros((1, 1, 1, 1), np.int64), "h": np.zeros((1, 1, 1, 1), np.int64),
           "q_idx": np.arange(nq).reshape(1, 1, nq, 1),
           "kv_idx": np.arange(nk).reshape(1, 1, 1, nk),
           "batch": 1, "heads": 1, "seq_q": nq, "seq_k": nk, "head_dim": 8, "value_dim": 8,
           "kv_heads": 1}
    with np.errstate(all="ignore"):
        value = np.asarray(evaluate(spec.mask, env, np), bool)
        return np.broadcast_to(value, (1, 1, nq, nk))[0, 0]


@pytest.mark.parametrize("mask", MASKS)
def test_plan_is_sound_for_every_new_function(mask):
    spec = attncc.load_spec({"attncc": 1, "mask": mask, "heads": 1, "head_dim": 8})
    nq, nk, bm, bn = 96, 80, 8, 16
    plan = build_plan(spec, {"batch": 1, "heads": 1, "seq_q": nq, "seq_k": nk, "head_dim": 8,
                             "value_dim": 8, "kv_heads": 1}, bm, bn)
    truth = dense(spec, nq, nk)
    states = np.asarray(plan.states)[0, 0]
    for i in range(states.shape[0]):
        for j in range(states.shape[1]):
            block = truth[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
            if states[i, j] == FULL:
                assert block.all(), (mask, i, j)
            if states[i, j] == EMPTY:
                assert not block.any(), (mask, i, j)


@pytest.mark.parametrize("mask", ["(q_idx >> 4) == (kv_idx >> 4)", "sign(q_idx - kv_idx) >= 0",
                                  "(q_idx > 30) == (kv_idx > 30)"])
def test_the_rules_skip_blocks(mask):
    spec = attncc.load_spec({"attncc": 1, "mask": mask, "heads": 1, "head_dim": 8})
    plan = build_plan(spec, {"batch": 1, "heads": 1, "seq_q": 64, "seq_k": 64, "head_dim": 8,
                             "value_dim": 8, "kv_heads": 1}, 16, 16)
    assert (np.asarray(plan.states) == EMPTY).any()


def test_a_score_mods_minus_inf_condition_becomes_the_mask():
    """where(c, score, -inf) is the mask c in the IR: the plan skips the blocks c removes."""
    spec = attncc.load_spec({"attncc": 1, "heads": 1, "head_dim": 8,
                             "score_mod": "where(kv_idx <= q_idx, score, -inf)"})
    plan = build_plan(spec, {"batch": 1, "heads": 1, "seq_q": 64, "seq_k": 64, "head_dim": 8,
                             "value_dim": 8, "kv_heads": 1}, 16, 16)
    assert (np.asarray(plan.states) == EMPTY).sum() == 6


def test_erf_bounds_enclose_erf_tightly_at_every_end():
    # the vectorised erf rule: sound at each end (math.erf inside), within 1e-6 wide, inside [-1, 1]
    import math

    import sympy

    from attncc.analysis.intervals import interval

    x = sympy.Symbol("x")
    ends = np.concatenate([np.linspace(-7.0, 7.0, 20001), [0.0, -np.inf, np.inf]])
    lo, hi = interval(sympy.erf(x), {"x": (ends, ends)})
    exact = np.array([math.erf(e) for e in ends])
    assert np.all(lo <= exact) and np.all(hi >= exact) and np.all(hi - lo <= 1.01e-6)
    assert lo.min() >= -1.0 and hi.max() <= 1.0
