"""Linear attention: feature maps φ, their vector-Jacobian products, the division rule, the scan.

Every function takes its namespace from its array argument (``array_api_compat``), so the same
code runs on NumPy arrays and on torch tensors (differentiable by torch autograd as written):

- ``elu1``: ``x + 1`` where ``x > 0``, else ``exp(x)`` (exact for very negative x, unlike
  ``elu(x) + 1``).
- ``relu``: ``max(x, 0)``; the vjp takes its derivative at 0 as 0 (torch autograd of
  ``maximum`` splits it there).
- ``performer`` (DESIGN §3): ``x' = x·head_dim^(-1/4)`` with head_dim the last axis of x,
  ``φ(x) = exp(x'·ωᵀ − ‖x'‖²/2) / √features`` for ``ω (features, head_dim)``.

Linear attention divides ``num = Σ_j φq_i·φk_j v_j`` by ``den = Σ_j φq_i·φk_j``; a zero
denominator (no kept key, or relu features all zero) gives 0, and no gradient reaches ``num``
there (``divide``; torch autograd differentiates it). ``linear_attention`` runs the whole
thing; causal, it scans chunks (``_causal``), so memory grows with the chunk, never with seq².
"""

from __future__ import annotations

import math

import array_api_compat

from attncc.bind import namespace
from attncc.lowering.env import merge_heads, split_heads

__all__ = ["FEATURE_MAPS", "divide", "feature_map",
           "linear_attention", "linear_text"]

FEATURE_MAPS = ("elu1", "relu", "performer")
#: feature map -> the pseudo-code of what ``feature_map`` computes (for ``kernel.source``)
FEATURE_TEXT = {
    "elu1": "where(x > 0, x + 1, exp(x))",
    "relu": "max(x, 0)",
    "performer": "exp(x' @ omega.T - |x'|²/2) / sqrt(features), x' = x * head_dim**-0.25",
}


def feature_map(kind: str, x, omega=None):
    """φ(x) over the last axis of ``x``; ``omega (features, head_dim)`` for performer only."""
    xp = namespace(x)
    if kind == "elu1":
        return xp.where(x > 0, x + 1, xp.exp(xp.minimum(x, 0.0)))
    if kind == "relu":
        return xp.maximum(x, 0.0)
    if kind != "performer":
        raise ValueError(f"unknown feature map {kind!r}; expected one of {FEATURE_MAPS}")
    if omega is None:
        raise ValueError("the performer feature map needs omega (features, head_dim)")
    xs, omega = x * x.shape[-1] ** -0.25, xp.astype(omega, x.dtype, copy=False)
    projected = xs @ omega.mT
    norm = xp.sum(xs * xs, axis=-1, keepdims=True) / 2
    return xp.exp(projected - norm) / math.sqrt(omega.shape[0])


def divide(num, den):
    """``num / den`` where ``den != 0``, else 0; ``den`` broadcasts against ``num``."""
    xp = namespace(num)
    empty = den == 0
    return xp.where(empty, 0.0, num / xp.where(empty, 1.0, den))


def linear_attention(node, q, k, v, omega=None, *, chunk: int):
    """``(B, H, Nq, Dv)`` in q's dtype of the LinearAttention ``node`` (its ``feature_map`` and
    ``causal``): ``out_i = φ(q_i)·S_i / φ(q_i)·z_i`` with ``S_i = Σ_j φ(k_j)ᵀ v_j`` and
    ``z_i = Σ_j φ(k_j)`` over every key, or (causal) over ``j <= i``, by chunks of ``chunk``
    positions; q ``(B, H, Nq, D)``, k, v ``(B, Hkv, Nk, .)``. The torch backend's scan; the
    numpy backend keeps its chunk loop (``attncc_numpy.linear``), whose tiles stay in cache at
    long sequences, where this vectorised scan's do not.

    The query heads of a kv head are stacked on the row axis of every product (or broadcast
    against a per-kv-head state), never K/V: nothing is copied per query head.
    """
    xp = namespace(q)
    phi_q = split_heads(feature_map(node.feature_map, q, omega), k.shape[1])   # B Hkv g Nq F
    phi_k = feature_map(node.feature_map, k, omega)                             # B Hkv Nk F
    if node.causal:
        num, den = _causal(xp, phi_q, phi_k, v, chunk)
    else:
        num = phi_q @ (phi_k.mT @ v)[:, :, None]
        den = phi_q @ xp.sum(phi_k, axis=-2)[:, :, None, :, None]
    return merge_heads(divide(num, den))


def _causal(xp, phi_q, phi_k, v, chunk: int):
    """``(num, den)`` ``(B, Hkv, g, Nq, Dv|1)`` of causal linear attention.

    The state entering a chunk is the sum of the earlier chunks' states (added up in a loop);
    inside the chunk a lower-triangular ``chunk × chunk`` product adds the rest. The ``g`` query
    heads of a kv head are stacked, ``(B, Hkv, n, g·C, F)`` against keys ``(B, Hkv, n, C, F)``:
    plain batched matmuls over kv heads (torch's matmul would copy a broadcast operand).
    """
    batch, kv_heads, group, nq, _ = phi_q.shape
    n, dev = -(-max(nq, phi_k.shape[-2]) // chunk), array_api_compat.device(v)

    def blocks(x):                                                  # ... N X -> ... n C X
        if x.shape[-2] < n * chunk:
            pad = (*x.shape[:-2], n * chunk - x.shape[-2], x.shape[-1])
            x = xp.concat([x, xp.zeros(pad, dtype=x.dtype, device=dev)], axis=-2)
        return xp.reshape(x, (*x.shape[:-2], n, chunk, x.shape[-1]))

    pk, pv = blocks(phi_k), blocks(v)                               # B Hkv n C F|Dv
    pq = xp.permute_dims(blocks(phi_q), (0, 1, 3, 2, 4, 5))         # B Hkv n g C F
    pq = xp.reshape(pq, (batch, kv_heads, n, group * chunk, pq.shape[-1]))
    kv, ks = pk.mT @ pv, xp.sum(pk, axis=-2)[..., None]             # B Hkv n F Dv|1
    before = [(xp.zeros_like(kv[:, :, 0]), xp.zeros_like(ks[:, :, 0]))]  # (S, z) entering chunks
    for c in range(n - 1):
        before.append((before[-1][0] + kv[:, :, c], before[-1][1] + ks[:, :, c]))
    lower = (xp.arange(group * chunk, device=dev) % chunk)[:, None] >= xp.arange(chunk, device=dev)
    inner = xp.where(lower, pq @ pk.mT, 0.0)                        # B Hkv n g·C C
    num = pq @ xp.stack([b[0] for b in before], axis=2) + inner @ pv
    den = pq @ xp.stack([b[1] for b in before], axis=2) + xp.sum(inner, axis=-1, keepdims=True)

    def unstack(x):                                                 # -> B Hkv g Nq X
        x = xp.reshape(x, (batch, kv_heads, n, group, chunk, x.shape[-1]))
        x = xp.permute_dims(x, (0, 1, 3, 2, 4, 5))
        return xp.reshape(x, (batch, kv_heads, group, n * chunk, x.shape[-1]))[..., :nq, :]

    return unstack(num), unstack(den)


def linear_text(kind: str, causal: bool, chunk: int) -> list[str]:
    """The pseudo-code of ``linear_attention`` (``kernel.source``)."""
    lines = [f"phi(x) = {FEATURE_TEXT[kind]}   # feature map {kind}", "fq, fk = phi(q), phi(k)"]
    if not causal:
        return [*lines, "out = fq @ (fk.T @ v) / (fq @ sum(fk))   # 0 where the denominator is 0"]
    return [*lines, f"causal, chunks c of {chunk}: S_c = fk_c.T @ v_c, z_c = sum(fk_c); "
            "sums of the chunks before c: S<_c = S<_(c-1) + S_(c-1), z<_c likewise",
            "out_c = (fq_c @ S<_c + tril(fq_c @ fk_c.T) @ v_c) / (fq_c @ z<_c + "
            "rowsum(tril(fq_c @ fk_c.T)))   # 0 where the denominator is 0"]
