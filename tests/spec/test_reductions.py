"""Bounded reductions in score_mod: ``sum(<expr> for d in range(N))`` and ``dot(x[...], y[...])``
parse to one ``sympy.Sum`` (the same object for the same contraction), with clear errors for
what falls outside the grammar, and evaluate on arrays as the explicit loop does."""

from __future__ import annotations

import numpy as np
import pytest
import sympy

import attncc
from attncc.spec.numeric import evaluate

INPUTS = {"qr": {"shape": ["batch", "heads", "seq_q", 16]},
          "kr": {"shape": ["batch", "kv_heads", "seq_k", "head_dim"]}}


def spec(score_mod, inputs=None, **keys):
    return attncc.load_spec({"attncc": 1, "head_dim": 16, "score_mod": score_mod,
                             "inputs": inputs or INPUTS, **keys})


def test_dot_is_the_sum_of_the_generator_form():
    """The trailing axes (16, and head_dim fixed to 16) are contracted; chained reads too."""
    a = spec("score + dot(qr[b, h, q_idx], kr[b][h // 2][kv_idx])").score_mod
    b = spec("score + sum(qr[b, h, q_idx, d] * kr[b, h // 2, kv_idx, d] for d in range(16))"
             ).score_mod
    assert a == b
    (total,) = a.atoms(sympy.Sum)
    assert total.limits[0][1:] == (0, 15)


@pytest.mark.parametrize(("score_mod", "inputs", "fragment"), [
    ("dot(qr[b, h, q_idx, 0], kr[b, h, kv_idx])", None,
     "dot() reads 'qr' (4 dimensions) with 3 index(es), leaving its trailing axis to contract; "
     "got 4"),
    ("dot(qr[b, h, q_idx], kr[b, h])", None, "dot() reads 'kr' (4 dimensions) with 3"),
    ("dot(qr[b, h, q_idx], 3)", None, "dot() takes two reads of inputs"),
    ("dot(qr[b, h, q_idx], qr[b, h, q_idx] * 2)", None, "dot() takes two reads of inputs"),
    ("dot(qr[b, h, q_idx], kr[b, h, kv_idx])",
     {**INPUTS, "kr": {"shape": ["batch", "heads", "seq_k", 8]}},
     "dot() contracts axes of equal size; 'qr' has 16, 'kr' has 8"),
    ("dot(kr[b, h, q_idx], kr[b, h, kv_idx])",
     {"kr": {"shape": ["batch", "heads", "seq_k", "seq_k"]}},
     "dot() contracts an axis of a fixed size 1..4096"),
    ("dot(qr[b, h, q_idx])", None, "dot() takes 2 argument(s), got 1"),
    ("sum(qr[b, h, q_idx, d] for d in range(5000))", None, "range() of a sum takes an integer"),
    ("sum(qr[b, h, q_idx, d] for d in range(seq_q))", None, "range() of a sum takes an integer"),
    ("sum(qr[b, h, q_idx, d] for d in range(4) if d)", None, "expected sum(<expression>"),
    ("sum(qr[b, h, q_idx, h] for h in range(4))", None, "'h' is already a name"),
    ("sum(dot(qr[b, h, q_idx], kr[b, h, kv_idx]) for e in range(2))", None,
     "dot(...) is allowed in score_mod only"),
])
def test_reduction_errors_are_clear(score_mod, inputs, fragment):
    with pytest.raises(attncc.SpecError, match="score_mod: column") as err:
        spec(score_mod, inputs)
    assert fragment in str(err.value)


def test_a_reduction_is_refused_outside_score_mod():
    with pytest.raises(attncc.SpecError, match=r"dot\(\.\.\.\) is allowed in score_mod only"):
        attncc.load_spec({"attncc": 1, "mask": "dot(qr[b, h, q_idx], qr[b, h, kv_idx]) > 0",
                          "inputs": {"qr": {"shape": ["batch", "heads", "seq_q", 4]}}})


def test_the_sum_evaluates_as_the_explicit_loop():
    """d on a new leading axis, summed away: the same values as the per-term loop."""
    expr = spec("score + dot(qr[b, h, q_idx], kr[b, h // 2, kv_idx]) * (q_idx - kv_idx)"
                ).score_mod
    rng = np.random.default_rng(0)
    qr, kr = rng.standard_normal((1, 2, 3, 16)), rng.standard_normal((1, 1, 5, 16))
    env = {"b": np.zeros((1, 1, 1, 1), np.int64), "h": np.arange(2).reshape(1, 2, 1, 1),
           "q_idx": np.arange(3).reshape(1, 1, 3, 1), "kv_idx": np.arange(5).reshape(1, 1, 1, 5),
           "score": np.zeros((1, 2, 3, 5)), "qr": qr, "kr": kr}
    got = evaluate(expr, env, np)
    want = (qr @ kr.transpose(0, 1, 3, 2)) * (np.arange(3)[:, None] - np.arange(5)[None, :])
    np.testing.assert_allclose(got, want)
