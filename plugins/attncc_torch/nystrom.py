"""Nyström attention (Xiong et al. 2021) in torch, matching the float64 reference's definition.

out = softmax(s·QK̃ᵀ) · pinv(softmax(s·Q̃K̃ᵀ)) · (softmax(s·Q̃Kᵀ) · V), landmarks the means of equal
contiguous segments. The pseudo-inverse is the exact ``torch.linalg.pinv`` (an m × m matrix per
head), so it agrees with the reference; memory is O(N·m). Query heads sharing a kv head broadcast
over their own axis (no K/V copy). Plain torch ops, so autograd is torch's own.
"""

from __future__ import annotations

import torch


def run_nystrom(q, k, v, landmarks: int, scale: float):
    """Output ``(B, H, Nq, Dv)`` for q ``(B, H, Nq, D)``, k/v ``(B, Hkv, Nk, D|Dv)``."""
    kv_heads = k.shape[1]
    q = q.unflatten(1, (kv_heads, -1))                               # B Hkv g Nq D
    k, v = k[:, :, None], v[:, :, None]                              # B Hkv 1 Nk D

    def land(x):
        return x.unflatten(-2, (landmarks, -1)).mean(-2)

    q_land, k_land = land(q), land(k)
    kernel_1 = torch.softmax(scale * (q @ k_land.transpose(-1, -2)), dim=-1)
    kernel_2 = torch.softmax(scale * (q_land @ k_land.transpose(-1, -2)), dim=-1)
    kernel_3 = torch.softmax(scale * (q_land @ k.transpose(-1, -2)), dim=-1)
    out = (kernel_1 @ torch.linalg.pinv(kernel_2)) @ (kernel_3 @ v)
    return out.flatten(1, 2)
