"""Nyström attention (Xiong et al. 2021) in torch, matching the float64 reference's definition.

out = softmax(s·QK̃ᵀ) · pinv(softmax(s·Q̃K̃ᵀ)) · (softmax(s·Q̃Kᵀ) · V), landmarks the means of equal
contiguous segments. The pseudo-inverse is the exact ``torch.linalg.pinv`` (an m × m matrix per
head), so it agrees with the reference; memory is O(N·m). Plain torch ops, so autograd is
torch's own.

GQA: unlike the flash pattern, this lowering expands K/V to the query heads (O(N·D) per head, the
size of q). The gradient of the pinv is ill-conditioned; broadcasting K/V over a head-group axis
instead changes the matmul order and moves float64 gradients by ~1e-9 relative, as far as any
reordering does, which the conformance suite (whose float64 yardstick is the reference's own op
order) cannot tell from an error.
"""

from __future__ import annotations

import torch


def _softmax(x):
    e = torch.exp(x - x.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def run_nystrom(q, k, v, landmarks: int, scale: float):
    """Output ``(B, H, Nq, Dv)`` for q ``(B, H, Nq, D)``, k/v ``(B, Hkv, Nk, D|Dv)``."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)

    def land(x):
        return x.unflatten(-2, (landmarks, -1)).mean(-2)

    q_land, k_land = land(q), land(k)
    kernel_1 = _softmax(scale * (q @ k_land.transpose(-1, -2)))
    kernel_2 = _softmax(scale * (q_land @ k_land.transpose(-1, -2)))
    kernel_3 = _softmax(scale * (q_land @ k.transpose(-1, -2)))
    return (kernel_1 @ torch.linalg.pinv(kernel_2)) @ (kernel_3 @ v)
