"""Index arithmetic is float64 on every namespace: a T5 bucket ``floor(log(...) * c)`` at the
positions where float32 rounding crosses a bucket boundary picks the same element in torch as
in NumPy's float64 (torch alone would compute ``float * int tensor`` in float32)."""

from __future__ import annotations

import array_api_compat
import numpy as np
import sympy
import torch

import attncc
from attncc.spec.numeric import evaluate

T5 = {"attncc": 1, "score_mod": "score + rel[h, min(floor(log(max(abs(q_idx - kv_idx), 8) / 8)"
                                " / log(128 / 8) * 24), 31) + 8]",
      "inputs": {"rel": {"shape": ["heads", 40]}}}


def test_t5_buckets_are_the_same_in_torch_and_numpy_at_every_position():
    spec = attncc.load_spec(T5)
    (atom,) = spec.score_mod.atoms(sympy.Indexed)
    q, kv = np.arange(4096).reshape(-1, 1), np.zeros((1, 1), np.int64)
    want = evaluate(atom.indices[1], {"q_idx": q, "kv_idx": kv, "h": 0}, np)
    rel = np.arange(40.0).reshape(1, 40)
    env = {"q_idx": torch.from_numpy(q), "kv_idx": torch.from_numpy(kv), "h": 0,
           "rel": torch.from_numpy(rel)}
    xp = array_api_compat.array_namespace(env["q_idx"])
    got = evaluate(atom, env, xp)  # the element read: its index, rounded down, plus 0
    np.testing.assert_array_equal(got.numpy().ravel(), np.floor(want).ravel())


def test_score_arithmetic_keeps_the_score_dtype():
    """Only indices are promoted: a float32 score tile stays float32."""
    spec = attncc.load_spec({"attncc": 1, "score_mod": "score + 0.1 * q_idx"})
    env = {"score": torch.zeros(2, 3), "q_idx": torch.arange(2).view(2, 1)}
    out = evaluate(spec.score_mod, env, array_api_compat.array_namespace(env["score"]))
    assert out.dtype == torch.float32
