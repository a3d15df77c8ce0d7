"""Nyström attention (Xiong et al. 2021) in torch, matching the float64 reference's definition.

out = softmax(s·QK̃ᵀ) · pinv(softmax(s·Q̃K̃ᵀ)) · (softmax(s·Q̃Kᵀ) · V), landmarks the means of equal
contiguous segments. The pseudo-inverse is the exact ``torch.linalg.pinv`` (an m × m matrix per
head), so it agrees with the reference; memory is O(N·m). Plain torch ops, so autograd is
torch's own.

GQA: the query heads of a kv head sit on an axis of their own, ``(B, Hkv, group, N, D)``, against
K/V viewed as ``(B, Hkv, 1, N, D)``: matmuls broadcast over it, K/V are never copied per query
head. (This orders the float64 arithmetic differently from the reference, which moves gradients
through the ill-conditioned pinv by ~cond²·ε; the conformance rule estimates float64's eager
error from float32's for exactly this reason, see ``attncc.testing.accuracy``.)
"""

from __future__ import annotations

import torch


def _softmax(x):
    e = torch.exp(x - x.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def run_nystrom(q, k, v, landmarks: int, scale: float):
    """Output ``(B, H, Nq, Dv)`` for q ``(B, H, Nq, D)``, k/v ``(B, Hkv, Nk, D|Dv)``."""
    kv_heads = k.shape[1]
    q = q.unflatten(1, (kv_heads, -1))                  # B Hkv g Nq D
    k, v = k[:, :, None], v[:, :, None]                  # B Hkv 1 Nk D|Dv

    def land(x):
        return x.unflatten(-2, (landmarks, -1)).mean(-2)

    q_land, k_land = land(q), land(k)
    kernel_1 = _softmax(scale * (q @ k_land.transpose(-1, -2)))
    kernel_2 = _softmax(scale * (q_land @ k_land.transpose(-1, -2)))
    kernel_3 = _softmax(scale * (q_land @ k.transpose(-1, -2)))
    out = (kernel_1 @ torch.linalg.pinv(kernel_2)) @ (kernel_3 @ v)
    return out.flatten(1, 2)
