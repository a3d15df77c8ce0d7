"""Running per-row state of the tiled kernel, one class per ``normalize`` kind.

Each state covers one query tile for a group of (batch, head) slices: ``lead`` is the shape
``(B', Hkv', G', rows)``. ``update(s, keep, v, cols)`` folds in one key tile: scores ``s`` of shape
``lead + (cols,)``, ``keep`` the mask (None: every pair kept, a FULL block), ``v`` the tile's values
``(B', Hkv', 1, cols, Dv)`` (broadcast over the query heads of a kv head, never copied) and
``cols`` the global key numbers (used by top-k). ``finish()`` returns ``(out, lse)``; lse is None
where the normalization has none.
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


class TopkState:
    """A running buffer of the K largest kept scores of each row and their global key numbers.

    ``finish`` gathers the values of the buffered keys from ``values`` (all keys of the slice,
    memory tokens first) and takes the softmax over the buffer: exactly the reference's softmax
    over the K largest kept scores (all kept ones where fewer than K are kept). Ties at the K-th
    score are broken arbitrarily, where the reference keeps every tied key.
    """

    def __init__(self, lead: tuple, value_dim: int, dtype, topk: int, values):
        self.topk = topk
        self.scores = np.full((*lead, topk), NEG_INF, dtype=dtype)
        self.keys = np.zeros((*lead, topk), dtype=np.int64)
        self.values = values

    def update(self, s, keep, v, cols) -> None:
        s = _masked(s, keep)
        scores = np.concatenate([self.scores, s], axis=-1)
        keys = np.concatenate([self.keys, np.broadcast_to(cols, s.shape)], axis=-1)
        best = np.argpartition(-scores, self.topk - 1, axis=-1)[..., :self.topk]
        self.scores = np.take_along_axis(scores, best, axis=-1)
        self.keys = np.take_along_axis(keys, best, axis=-1)

    def finish(self):
        row_max = self.scores.max(axis=-1)
        kept = ~np.isneginf(row_max)
        safe = np.where(kept, row_max, 0).astype(self.scores.dtype)
        weights = np.exp(self.scores - safe[..., None])
        total = weights.sum(axis=-1)
        denom = np.where(kept, total, 1)
        vals = self.values
        b = np.arange(vals.shape[0]).reshape(-1, 1, 1, 1, 1)
        h = np.arange(vals.shape[1]).reshape(1, -1, 1, 1, 1)
        gathered = vals[b, h, 0, self.keys]  # (B', Hkv', G', rows, K, Dv)
        out = np.einsum("...k,...kd->...d", weights / denom[..., None], gathered)
        out = np.where(kept[..., None], out, 0)
        with np.errstate(divide="ignore"):
            lse = np.where(kept, safe + np.log(denom), NEG_INF)
        return out, lse
