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

import torch
import torch.nn.functional as F  # noqa: N812 - the name torch code uses

from attncc.lowering.env import split_heads
from attncc.lowering.features import divide, feature_map


def run_linear(node, call, chunk: int):
    """Output ``(B, H, Nq, Dv)`` of the LinearAttention ``node`` for a checked ``call``, in the
    compute dtype; the feature maps and the zero-denominator rule are the shared ones."""
    q, k, v = call.q, call.k, call.v
    omega = call.inputs.get("omega")
    phi_q = split_heads(feature_map(node.feature_map, q, omega), k.shape[1])   # B Hkv g Nq F
    phi_k = feature_map(node.feature_map, k, omega)
    if not node.causal:
        state = (phi_k.transpose(-1, -2) @ v)[:, :, None]            # B Hkv 1 F Dv
        num = phi_q @ state
        den = phi_q @ phi_k.sum(-2)[:, :, None, :, None]
    else:
        num, den = _causal(phi_q, phi_k, v, chunk, q.shape[2], k.shape[2])
    return divide(num, den).flatten(1, 2)


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
