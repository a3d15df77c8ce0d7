"""Linear attention in chunks: causal by running prefix sums of φ(k)ᵀv and φ(k).

``out_i = φ(q_i)·S_i / φ(q_i)·z_i`` with ``S_i = Σ_{j≤i} φ(k_j)ᵀ v_j`` and ``z_i = Σ_{j≤i} φ(k_j)``.
For a query chunk ``[c0, c1)`` the keys before ``c0`` are in the running sums; the keys of the chunk
itself are handled by a small masked product (the diagonal block). Without the causal mask the
sums cover every key. Memory grows with the chunk, never with seq². φ and the zero-denominator
rule are ``attncc.lowering.features``; this loop's chunk tiles stay in cache.
"""

from __future__ import annotations

import numpy as np

from attncc.lowering.env import merge_heads, shared_kv, split_heads
from attncc.lowering.features import FEATURE_TEXT, divide, feature_map

DENSE_TEXT = ("out = fq @ (fk.T @ v) / (fq @ sum(fk))   # 0 where the denominator is 0",)
CAUSAL_TEXT = (
    "S = 0; z = 0                                # running Σ fkᵀv, Σ fk",
    "for c in range(ceil(Nq / {chunk})):            # query chunks",
    "    rows = [c*{chunk}, (c+1)*{chunk})",
    "    a = tril(fq[rows] @ fk[rows].T)         # diagonal block, kv_idx <= q_idx",
    "    out[rows] = (fq[rows] @ S + a @ v[rows]) / (fq[rows] @ z + rowsum(a))   # 0 where 0",
    "    S += fk[rows].T @ v[rows]; z += sum(fk[rows])")


def describe(node, chunk: int) -> list[str]:
    """The pseudo-code of ``run_linear`` (``kernel.source``)."""
    body = CAUSAL_TEXT if node.causal else DENSE_TEXT
    return [f"phi(x) = {FEATURE_TEXT[node.feature_map]}   # feature map {node.feature_map}",
            "fq, fk = phi(q), phi(k)", *(t.format(chunk=chunk) for t in body)]


def run_linear(node, q, k, v, inputs: dict, chunk: int):
    """Output ``(B, Hq, Nq, Dv)``; k and v are shared by the query heads of a kv head
    (broadcast: NumPy's matmul copies nothing)."""
    omega = inputs.get("omega")
    phi_q = feature_map(node.feature_map, split_heads(q, k.shape[1]), omega)
    phi_k = feature_map(node.feature_map, shared_kv(k), omega)
    v5 = shared_kv(v)
    if node.causal:
        num, den = _causal(phi_q, phi_k, v5, chunk, k.shape[2])
    else:
        num = phi_q @ (np.swapaxes(phi_k, -1, -2) @ v5)
        den = phi_q @ phi_k.sum(axis=-2)[..., None]
    return merge_heads(divide(num, den))


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
