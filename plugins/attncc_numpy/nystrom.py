"""Nyström attention (Xiong et al. 2021) with segment-mean landmarks.

out = softmax(s·Q K̃ᵀ) · pinv(softmax(s·Q̃ K̃ᵀ)) · softmax(s·Q̃ Kᵀ) · V. The three softmaxes are
small (landmarks × seq); the landmark matrix is inverted in float64 with the same Moore–Penrose
pinv (and tolerance) as the reference, whatever the compute dtype, since it is tiny and can be
badly conditioned. K and V are shared by the query heads of a kv head (broadcast, not copied).
"""

from __future__ import annotations

import array_api_compat.numpy as xp64
import numpy as np


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _landmarks(x, m: int):
    *lead, n, d = x.shape
    return x.reshape(*lead, m, n // m, d).mean(axis=-2)


def run_nystrom(spec, q, k, v, scale: float):
    """Output ``(B, Hq, Nq, Dv)`` in q's dtype."""
    batch, heads, seq_q, head_dim = q.shape
    kv_heads = k.shape[1]
    m = spec.lowrank.size
    q5 = q.reshape(batch, kv_heads, heads // kv_heads, seq_q, head_dim)
    k5, v5 = k[:, :, None], v[:, :, None]
    s = q.dtype.type(scale)
    q_land, k_land = _landmarks(q5, m), _landmarks(k5, m)
    kernel_1 = _softmax(s * (q5 @ np.swapaxes(k_land, -1, -2)))
    kernel_2 = _softmax(s * (q_land @ np.swapaxes(k_land, -1, -2)))
    kernel_3 = _softmax(s * (q_land @ np.swapaxes(k5, -1, -2)))
    inverse = np.asarray(xp64.linalg.pinv(kernel_2.astype(np.float64))).astype(q.dtype)
    out = (kernel_1 @ inverse) @ (kernel_3 @ v5)
    return out.reshape(batch, heads, seq_q, v.shape[-1])
