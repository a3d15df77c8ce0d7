"""Linear attention in chunks: causal by running prefix sums of φ(k)ᵀv and φ(k).

``out_i = φ(q_i)·S_i / φ(q_i)·z_i`` with ``S_i = Σ_{j≤i} φ(k_j)ᵀ v_j`` and ``z_i = Σ_{j≤i} φ(k_j)``.
For a query chunk ``[c0, c1)`` the keys before ``c0`` are in the running sums; the keys of the chunk
itself are handled by a small masked product (the diagonal block). Without a mask the sums cover
every key. Memory grows with the chunk, never with seq². A zero denominator gives 0.
"""

from __future__ import annotations

import math

import numpy as np


def features(kind: str, x, omega, head_dim: int, n_features: int | None):
    """φ(x) on the last axis: elu1, relu, or performer (positive random features)."""
    if kind == "elu1":
        return np.where(x > 0, x + 1, np.exp(np.minimum(x, 0)))
    if kind == "relu":
        return np.maximum(x, 0)
    xs = x * x.dtype.type(head_dim ** -0.25)
    projected = xs @ omega.T
    norm = (xs * xs).sum(axis=-1, keepdims=True) / 2
    return np.exp(projected - norm) / x.dtype.type(math.sqrt(n_features))


def run_linear(spec, q, k, v, inputs: dict, chunk: int):
    """Output ``(B, Hq, Nq, Dv)``; k and v are shared by the query heads of a kv head."""
    batch, heads, seq_q, head_dim = q.shape
    kv_heads, seq_k, value_dim = k.shape[1], k.shape[2], v.shape[-1]
    group = heads // kv_heads
    omega = inputs.get("omega")
    phi_q = features(spec.feature_map, q.reshape(batch, kv_heads, group, seq_q, head_dim),
                     omega, head_dim, spec.features)
    phi_k = features(spec.feature_map, k[:, :, None], omega, head_dim, spec.features)
    v5 = v[:, :, None]
    if spec.mask is None:
        num = phi_q @ (np.swapaxes(phi_k, -1, -2) @ v5)
        den = phi_q @ phi_k.sum(axis=-2)[..., None]
    else:
        num, den = _causal(phi_q, phi_k, v5, chunk, seq_k)
    safe = np.where(den == 0, 1, den)
    out = np.where(den == 0, 0, num / safe)
    return out.reshape(batch, heads, seq_q, value_dim)


def _causal(phi_q, phi_k, v5, chunk: int, seq_k: int):
    seq_q = phi_q.shape[-2]
    lead = phi_k.shape[:3]
    kv_sum = np.zeros((*lead, phi_k.shape[-1], v5.shape[-1]), dtype=phi_q.dtype)
    k_sum = np.zeros((*lead, phi_k.shape[-1], 1), dtype=phi_q.dtype)
    nums, dens = [], []
    for c0 in range(0, seq_q, chunk):
        c1 = min(c0 + chunk, seq_q)
        fq = phi_q[..., c0:c1, :]
        num, den = fq @ kv_sum, fq @ k_sum
        k1 = min(c1, seq_k)
        if c0 < k1:
            fk, vc = phi_k[..., c0:k1, :], v5[..., c0:k1, :]
            diag = fq @ np.swapaxes(fk, -1, -2)
            causal = np.arange(c0, k1)[None, :] <= np.arange(c0, c1)[:, None]
            diag = np.where(causal, diag, 0)
            num = num + diag @ vc
            den = den + diag.sum(axis=-1, keepdims=True)
            kv_sum = kv_sum + np.swapaxes(fk, -1, -2) @ vc
            k_sum = k_sum + fk.sum(axis=-2)[..., None]
        nums.append(num)
        dens.append(den)
    return np.concatenate(nums, axis=-2), np.concatenate(dens, axis=-2)
