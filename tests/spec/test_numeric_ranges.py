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
