"""``evaluate(..., ranges=)``: a caller's promise that an index symbol stays in ``[0, n)`` lets an
input axis of size >= n be read without a bounds check; anything else is still checked."""

from __future__ import annotations

import numpy as np
import pytest
import sympy

from attncc.errors import InputError
from attncc.spec.numeric import evaluate

b, kv = sympy.Symbol("b", integer=True), sympy.Symbol("kv_idx", integer=True)
keep = sympy.IndexedBase("keep")


def _env(n: int) -> dict:
    return {"b": np.arange(2)[:, None], "kv_idx": np.arange(n)[None, :],
            "keep": np.arange(2 * 6).reshape(2, 6) % 3 == 0}


def test_a_promised_range_reads_the_input_as_the_checked_path_does():
    env = _env(6)
    checked = evaluate(keep[b, kv], env, np)
    promised = evaluate(keep[b, kv], env, np, ranges={"b": 2, "kv_idx": 6})
    assert np.array_equal(checked, promised) and np.array_equal(checked, env["keep"])


def test_an_index_past_the_axis_is_still_refused():
    env = _env(7)  # one key more than the input holds
    with pytest.raises(InputError, match="indexed outside its axis 1 of size 6"):
        evaluate(keep[b, kv], env, np)
    with pytest.raises(InputError, match="indexed outside its axis 1"):
        evaluate(keep[b, kv], env, np, ranges={"kv_idx": 7})  # the promise exceeds the axis
    with pytest.raises(InputError, match="indexed outside its axis 1"):
        evaluate(keep[b, kv + 1], _env(6), np, ranges={"kv_idx": 6})  # not a bare symbol


def test_integer_indices_meet_floats_in_the_calls_precision():
    """torch turns ``int64 * 0.01`` into its float32 default: where the environment holds a
    float64 score the product is float64 (as NumPy and the reference compute it), and a float32
    score keeps it float32."""
    import array_api_compat.torch as xp
    import torch

    expr = sympy.Symbol("score") * (1 + kv / 100)
    kv_idx = torch.arange(1000)[None, :]
    for dtype in (torch.float64, torch.float32):
        s = torch.full((2, 1000), 1 / 3, dtype=dtype)
        got = evaluate(expr, {"score": s, "kv_idx": kv_idx}, xp)
        want = (1 / 3) * (1 + np.arange(1000) / 100)
        assert got.dtype == dtype
        tol = 1e-15 if dtype == torch.float64 else 1e-6
        assert np.allclose(got[0].numpy(), want, rtol=tol, atol=0)
