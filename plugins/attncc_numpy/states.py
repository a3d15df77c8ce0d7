"""Running per-row state of the tiled kernel, one class per ``normalize`` kind.

Each state covers one query tile for a group of (batch, head) slices: ``lead`` is the shape
``(B', Hkv', G', rows)``. ``update(s, keep, v, cols)`` folds in one key tile: scores ``s`` of shape
``lead + (cols,)``, ``keep`` the mask (None: every pair kept, a FULL block), ``v`` the tile's values
``(B', Hkv', 1, cols, Dv)`` (broadcast over the query heads of a kv head, never copied) and
``cols`` the global key numbers. ``finish()`` returns ``(out, lse)``; lse is None where the
normalization has none. Top-k is two passes: ``TopkThreshold``, then ``SoftmaxState``.
"""

from __future__ import annotations

import numpy as np

NEG_INF = -np.inf


def _masked(s, keep):
    return s if keep is None else np.where(keep, s, NEG_INF)


class SoftmaxState:
    """Online softmax (FlashAttention): running row max, row sum and rescaled accumulator."""

    def __init__(self, lead: tuple, value_dim: int, dtype):
        self.row_max = np.full(lead, NEG_INF, dtype=dtype)
        self.row_sum = np.zeros(lead, dtype=dtype)
        self.acc = np.zeros((*lead, value_dim), dtype=dtype)

    def update(self, s, keep, v, cols=None) -> None:
        s = _masked(s, keep)
        new_max = np.maximum(self.row_max, s.max(axis=-1))
        safe = np.where(np.isneginf(new_max), 0, new_max).astype(s.dtype)
        p = np.exp(s - safe[..., None])
        alpha = np.exp(self.row_max - safe)
        self.row_sum = self.row_sum * alpha + p.sum(axis=-1)
        self.acc = self.acc * alpha[..., None] + p @ v
        self.row_max = new_max

    def finish(self):
        kept = self.row_sum > 0
        denom = np.where(kept, self.row_sum, 1)[..., None]
        out = np.where(kept[..., None], self.acc / denom, 0)
        with np.errstate(divide="ignore"):
            lse = np.where(kept, self.row_max + np.log(np.where(kept, self.row_sum, 1)), NEG_INF)
        return out, lse


class SigmoidState:
    """Σ sigmoid(s)·v over kept keys: no running max is needed, tiles simply add up."""

    def __init__(self, lead: tuple, value_dim: int, dtype):
        self.acc = np.zeros((*lead, value_dim), dtype=dtype)

    def update(self, s, keep, v, cols=None) -> None:
        weights = np.exp(-np.logaddexp(0, -s))
        if keep is not None:
            weights = np.where(keep, weights, 0)
        self.acc = self.acc + weights @ v

    def finish(self):
        return self.acc, None


class TopkThreshold:
    """First pass of top-k: a running buffer of the K largest kept scores of each row.

    ``value()`` is the K-th largest kept score, or -inf where fewer than K are kept. The second
    pass is a SoftmaxState over the keys with score >= that threshold: exactly the reference's
    softmax over the K largest kept scores, every key tied at the K-th score included.
    """

    def __init__(self, lead: tuple, topk: int, dtype):
        self.topk = topk
        self.scores = np.full((*lead, topk), NEG_INF, dtype=dtype)

    def update(self, s, keep) -> None:
        scores = np.concatenate([self.scores, _masked(s, keep)], axis=-1)
        self.scores = -np.partition(-scores, self.topk - 1, axis=-1)[..., :self.topk]

    def value(self):
        return self.scores.min(axis=-1)
