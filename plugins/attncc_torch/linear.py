"""Linear attention in torch: feature maps, then chunked sums; causal by prefix sums of chunks.

``out_i = φ(q_i)·S_i / φ(q_i)·z_i`` with ``S_i = Σ_j φ(k_j) v_jᵀ`` and ``z_i = Σ_j φ(k_j)`` over
all keys, or over ``j ≤ i`` when causal. Causal runs in chunks of ``chunk`` positions: the
state entering a chunk is an exclusive prefix sum of per-chunk states, and inside the chunk a
``chunk × chunk`` lower-triangular product adds the rest, so memory is O(N·chunk + N/chunk·F·Dv),
never N². Plain torch ops, so autograd (q, k, v and the Performer's ``omega``) is torch's own.
Query heads sharing a kv head are stacked on the row axis of each product (or broadcast against
a per-kv-head state, never against K/V): K/V are not copied per query head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812 - the name torch code uses


def features(kind: str, x, omega, head_dim: int, n_features: int | None):
    """φ(x) over the last axis: elu1, relu, or Performer's positive random features."""
    if kind == "elu1":
        return F.elu(x) + 1.0
    if kind == "relu":
        return torch.relu(x)
    xs = x * head_dim ** -0.25
    projected = xs @ omega.transpose(0, 1)
    norm = (xs * xs).sum(-1, keepdim=True) / 2.0
    return torch.exp(projected - norm) / math.sqrt(n_features)


def run_linear(spec, sizes: dict, q, k, v, inputs: dict, chunk: int):
    """Output ``(B, H, Nq, Dv)`` in the dtype of q (already the compute dtype)."""
    _, heads, nq, d = q.shape
    kv_heads, nk = k.shape[1], k.shape[2]
    omega = inputs.get("omega")
    phi_q = features(spec.feature_map, q, omega, d, spec.features)
    phi_k = features(spec.feature_map, k, omega, d, spec.features)
    phi_q = phi_q.unflatten(1, (kv_heads, heads // kv_heads))       # B Hkv g Nq F
    if spec.mask is None:
        state = (phi_k.transpose(-1, -2) @ v)[:, :, None]            # B Hkv 1 F Dv
        num = phi_q @ state
        den = phi_q @ phi_k.sum(-2)[:, :, None, :, None]
    else:
        num, den = _causal(phi_q, phi_k, v, chunk, nq, nk)
    out = torch.where(den == 0, 0.0, num / torch.where(den == 0, 1.0, den))
    return out.flatten(1, 2)


def _causal(phi_q, phi_k, v, chunk: int, nq: int, nk: int):
    """``(num, den)`` of causal linear attention, ``(B, Hkv, g, Nq, Dv|1)``.

    Inside a chunk the ``g`` query heads of a kv head are stacked on the row axis,
    ``(B, Hkv, n, g·C, F)`` against keys ``(B, Hkv, n, C, F)``: every product is a plain batched
    matmul over kv heads, so nothing broadcasts (torch's matmul would copy a broadcast operand).
    """
    length = -(-max(nq, nk) // chunk) * chunk
    group = phi_q.shape[2]

    def pad(x, n):
        x = F.pad(x, (0, 0, 0, length - n))
        return x.unflatten(-2, (-1, chunk))                          # ... n_chunks C X

    pk, pv = pad(phi_k, nk), pad(v, nk)                               # B Hkv n C F|Dv
    pq = pad(phi_q, nq).permute(0, 1, 3, 2, 4, 5).flatten(3, 4)      # B Hkv n g·C F
    states = pk.transpose(-1, -2) @ pv                               # B Hkv n F Dv
    sums = pk.sum(-2)                                                # B Hkv n F
    before = torch.cumsum(states, dim=-3) - states
    z_before = torch.cumsum(sums, dim=-2) - sums
    inner = pq @ pk.transpose(-1, -2)                                # B Hkv n g·C C
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=inner.device).tril()
    inner = torch.where(lower.repeat(group, 1), inner, 0.0)
    num = pq @ before + inner @ pv                                   # B Hkv n g·C Dv
    den = pq @ z_before[..., None] + inner.sum(-1, keepdim=True)     # B Hkv n g·C 1

    def unstack(x):                                                  # -> B Hkv g Nq X
        x = x.unflatten(3, (group, chunk)).permute(0, 1, 3, 2, 4, 5).flatten(3, 4)
        return x[..., :nq, :]

    return unstack(num), unstack(den)
