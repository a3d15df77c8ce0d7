"""Low-rank attention: the Linformer projection and Nyström attention (Xiong et al. 2021).

- Linformer projects keys and values along the sequence, ``k ← E·k``, ``v ← F·v`` with
  ``E, F (rank, seq_k)``; the fused kernel then attends over ``rank`` keys.
- Nyström: ``out = softmax(s·Q K̃ᵀ) · pinv(softmax(s·Q̃ K̃ᵀ)) · (softmax(s·Q̃ Kᵀ) · V)`` with
  landmarks Q̃, K̃ the means of ``landmarks`` equal contiguous segments of the sequence. The three
  softmaxes are small (landmarks × seq). The landmark matrix is inverted with the array-API
  Moore–Penrose ``linalg.pinv`` (default tolerance ``max(m, n)·eps``, as the reference), in
  float64 by default whatever the compute dtype: it is tiny and can be badly conditioned.

Query heads that share a kv head sit on their own axis, ``(B, Hkv, G, N, D)``, against K/V
viewed ``(B, Hkv, 1, N, D)``: every product broadcasts over the group, K/V are never copied per
query head. Namespace-generic (NumPy, torch with autograd).
"""

from __future__ import annotations

from attncc.bind import namespace
from attncc.lowering.env import merge_heads, shared_kv, split_heads

__all__ = ["linformer", "nystrom", "nystrom_factors", "nystrom_text", "segment_means",
           "softmax"]


def linformer(k, v, e, f):
    """``(E·k, F·v)``: k ``(B, Hkv, seq_k, D)``, v likewise, ``E, F (rank, seq_k)``."""
    return e @ k, f @ v


def segment_means(x, landmarks: int):
    """Means of ``landmarks`` equal contiguous segments of axis -2 (which it must divide)."""
    xp = namespace(x)
    *lead, n, d = x.shape
    return xp.mean(xp.reshape(x, (*lead, landmarks, n // landmarks, d)), axis=-2)


def softmax(x):
    """Softmax over the last axis (dense rows, every entry finite)."""
    xp = namespace(x)
    e = xp.exp(x - xp.max(x, axis=-1, keepdims=True))
    return e / xp.sum(e, axis=-1, keepdims=True)


def nystrom(q, k, v, landmarks: int, scale: float, *, exact_pinv: bool = True):
    """Nyström attention ``(B, H, Nq, Dv)`` in q's dtype for q ``(B, H, Nq, D)`` and k, v
    ``(B, Hkv, Nk, D|Dv)``; ``exact_pinv``: invert in float64 (else in q's dtype)."""
    q5, k5, v5 = split_heads(q, k.shape[1]), shared_kv(k), shared_kv(v)
    kernel_1, inverse, kernel_3 = nystrom_factors(q5, k5, landmarks, scale,
                                                  exact_pinv=exact_pinv)
    return merge_heads((kernel_1 @ inverse) @ (kernel_3 @ v5))


def nystrom_factors(q, k, landmarks: int, scale: float, *, exact_pinv: bool = True, rows=None):
    """``(K1, pinv(K2), K3)`` of Nyström attention, ``out = (K1·pinv(K2))·(K3·v)``, for q and k
    of broadcast-compatible leading axes; ``rows`` (an integer array, optional): K1 of those
    query rows only (the landmarks always come from every row)."""
    xp = namespace(q)
    q_land, k_land = segment_means(q, landmarks), segment_means(k, landmarks)
    k_land_t = k_land.mT
    q_rows = q if rows is None else xp.take(q, rows, axis=-2)
    kernel_1 = softmax(scale * (q_rows @ k_land_t))
    kernel_2 = softmax(scale * (q_land @ k_land_t))
    kernel_3 = softmax(scale * (q_land @ k.mT))
    inverted = xp.linalg.pinv(xp.astype(kernel_2, xp.float64) if exact_pinv else kernel_2)
    return kernel_1, xp.astype(inverted, q.dtype, copy=False), kernel_3


def nystrom_text(landmarks: int, scale: str, *, exact_pinv: bool) -> list[str]:
    """The pseudo-code of ``nystrom`` (``kernel.source``), ``scale`` as printed."""
    pinv = "in float64" if exact_pinv else "in the compute dtype"
    return [f"q~, k~ = segment means of q, k over {landmarks} landmarks   # GQA: a group axis "
            "broadcast against k, v (never copied)",
            f"k1 = softmax(({scale}) * q @ k~.T); k2 = softmax(({scale}) * q~ @ k~.T)",
            f"k3 = softmax(({scale}) * q~ @ k.T)",
            f"out = (k1 @ pinv(k2)) @ (k3 @ v)      # Moore–Penrose pinv {pinv}"]
