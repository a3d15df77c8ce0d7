"""Plans at their limits: conditions nested in where(), integers past int64, plans too large to
hold; each gives the right answer or one clear attncc error."""

from __future__ import annotations

import numpy as np
import pytest

import attncc
from attncc.plan import build_plan


def test_a_where_inside_a_condition_evaluates_and_classifies():
    mask = "where(kv_idx <= where(q_idx > 3, 5, 9), 1, 0) > 0"
    spec = attncc.load_spec({"attncc": 1, "mask": mask})
    q = np.random.default_rng(0).standard_normal((1, 2, 16, 8))
    out = attncc.compile(spec, backend="numpy", config={"block_m": 16, "block_n": 16})(q, q, q)
    assert np.abs(out - attncc.reference(spec, q, q, q)).max() < 1e-12
    assert build_plan(spec, {"seq_q": 64, "seq_k": 64}, 4, 4).states.size == 256


def test_integer_overflow_is_an_error_not_a_wrong_answer():
    spec = attncc.load_spec({"attncc": 1, "mask": "(q_idx - kv_idx)**2 * 10**18 <= 4 * 10**18"})
    with pytest.raises(attncc.InputError, match="64-bit integers"):
        build_plan(spec, {"seq_q": 64, "seq_k": 64}, 16, 16)
    q = np.zeros((1, 1, 64, 4))
    with pytest.raises(attncc.InputError, match="64-bit integers"):
        attncc.reference(spec, q, q, q)


def test_a_plan_too_large_to_hold_is_an_error():
    with pytest.raises(attncc.InputError, match="block pairs"):
        build_plan(attncc.load_spec("examples/causal.yaml"),
                   {"seq_q": 10 ** 8, "seq_k": 10 ** 8}, 64, 64)


def test_an_index_that_may_leave_its_axis_is_checked_by_the_kernel():
    """``tbl[doc[b, q_idx]]`` with ids past tbl's axis: the plan cannot call those blocks FULL
    (it would skip the mask and its bounds check), so every backend says what the reference
    says; in-range ids still run."""
    from attncc.errors import InputError

    spec = {"attncc": 1, "name": "nested", "mask": "tbl[doc[b, q_idx]] > 0",
            "inputs": {"doc": {"shape": ["batch", "seq_q"], "dtype": "int32"},
                       "tbl": {"shape": [4], "dtype": "int32"}}}
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 2, n, 8)).astype(np.float32) for n in (60, 128, 128))
    tbl = np.ones(4, dtype=np.int32)
    kernel = attncc.compile(spec, backend="numpy")
    with pytest.raises(InputError, match="indexed outside its axis 0 of size 4"):
        kernel(q, k, v, doc=np.full((2, 60), 7, dtype=np.int32), tbl=tbl)
    out = kernel(q, k, v, doc=np.full((2, 60), 3, dtype=np.int32), tbl=tbl)
    assert np.isfinite(out).all()
