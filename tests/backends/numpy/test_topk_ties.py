"""Top-k with ties at the K-th score: every backend keeps every tied key, as the reference does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attncc


@pytest.mark.parametrize("name", ["hard_attention", "topk"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_tied_scores_are_all_kept(name, backend):
    spec = attncc.load_spec(f"examples/{name}.yaml")
    rng = np.random.default_rng(0)
    q = np.round(rng.standard_normal((2, 4, 50, 16))).astype(np.float32)
    k = np.round(rng.standard_normal((2, 4, 50, 16))).astype(np.float32)
    k[:] = k[:, :, :1]  # every key of a head equal: every score of a row ties
    v = rng.standard_normal((2, 4, 50, 16)).astype(np.float32)
    ref = attncc.reference(spec, q, k, v)
    kernel = attncc.compile(spec, backend=backend)
    args = (q, k, v) if backend == "numpy" else tuple(torch.from_numpy(x) for x in (q, k, v))
    out = np.asarray(kernel(*args))
    assert np.abs(out - ref).max() < 1e-5
