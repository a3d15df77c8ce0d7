"""``attncc.bind.bind`` binds a call whose signature it checked before from a cache: the cached
result equals a fresh check, and a call that differs in any checked respect is checked anew."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attncc
from attncc.bind import bind
from attncc.errors import InputError

SPEC = attncc.load_spec({"attncc": 1, "name": "bind_cache", "heads": 4, "kv_heads": 2,
                         "mask": "keep[b, kv_idx]", "score_mod": "score * gain",
                         "inputs": {"keep": {"shape": ["batch", "seq_k"], "dtype": "bool"},
                                    "gain": {"shape": [], "dtype": "float32"}}})


def _call(seq_k=9, **change):
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, seq_k, 8), torch.randn(2, 2, seq_k, 8)
    inputs = {"keep": torch.ones(2, seq_k, dtype=torch.bool), "gain": torch.tensor(0.5)}
    args = {"q": q, "k": k, "v": v, **inputs, **change}
    return args.pop("q"), args.pop("k"), args.pop("v"), args


def test_a_repeated_signature_binds_as_a_fresh_check():
    first = bind(SPEC, *_call())
    q, k, v, inputs = _call()
    again = bind(SPEC, q, k, v, inputs)
    assert again.sizes == first.sizes and again.scale == first.scale
    assert again.inputs["keep"] is inputs["keep"]
    assert again.inputs["gain"].shape == (1,)  # a 0-d input is read as gain[0]


@pytest.mark.parametrize("change, message", [
    ({"keep": torch.ones(2, 8, dtype=torch.bool)}, "keep: expected shape"),
    ({"keep": torch.ones(2, 9)}, "keep: expected a bool dtype"),
    ({"gain": np.float32(0.5) * np.ones(())}, "gain: expected the same kind of array"),
    ({"k": torch.randn(2, 2, 9, 8, dtype=torch.float64)}, "expected one dtype"),
    ({"v": torch.randn(2, 3, 9, 8)}, "expected shape"),
    ({"extra": torch.ones(1)}, "unexpected input 'extra'"),
])
def test_a_changed_signature_is_checked_again(change, message):
    bind(SPEC, *_call())
    with pytest.raises(InputError, match=message):
        bind(SPEC, *_call(**change))
    with pytest.raises(InputError, match="missing input 'gain'"):
        q, k, v, inputs = _call()
        bind(SPEC, q, k, v, {"keep": inputs["keep"]})
