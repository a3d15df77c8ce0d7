"""Running per-row state of a tiled attention kernel, folded one key tile at a time.

A state covers a block of query rows; ``lead`` is the shape of the rows, ``(..., rows)``, and
per-row statistics are kept as ``(..., rows, 1)``. ``update(s, v, keep)`` folds in one tile:
scores ``s (..., rows, cols)``, values ``v (..., cols, Dv)`` (broadcast against the rows' leading
axes, e.g. over the query heads of a kv head, never copied) and ``keep`` the mask (None: every
pair kept; a removed pair may also arrive as a score of -inf). ``finish()`` gives ``Rows``.

The rules, defined here once for every backend:

- A row with no kept key gives out 0 and lse -inf (row max 0 and 1/sum 0 in the statistics), so
  a backward pass rebuilding ``P = exp(s − row_max) · inv_sum`` gets 0 there.
- Top-k is two passes: ``TopkThreshold`` finds each row's K-th largest kept score (-inf where
  fewer than K are kept), then the softmax runs over the kept scores ``>=`` it, so every key tied
  at the K-th score is kept, exactly as the reference.
- Sigmoid weights are ``sigmoid(s)``: no running max, tiles simply add up.

``like`` (any array) gives the namespace, dtype and device. With ``inplace=True`` the state's
accumulators are updated in place and ``update(..., owned=True)`` may overwrite the score tile:
for kernels outside autograd (the numpy backend, torch's flash forward). With the defaults every
step is a pure function of its inputs, so torch autograd can differentiate through it.
"""

from __future__ import annotations

import math
import operator
from typing import NamedTuple

import array_api_compat
import numpy as np

from attncc.bind import namespace
from attncc.spec.numeric import logistic

__all__ = ["STATE_TEXT", "TOPK_TEXT", "Rows", "SigmoidState", "SoftmaxState", "TopkThreshold",
           "fold", "sigmoid"]

NEG_INF = -math.inf

_SOFTMAX = ("state = SoftmaxState()   # online softmax: row_max = -inf, row_sum = 0, acc = 0",
            "state.update(s, {v})   # p = exp(s - new_max); alpha = exp(row_max - new_max); "
            "row_sum = alpha * row_sum + rowsum(p); acc = alpha * acc + p @ {v}",
            "out, lse = acc / row_sum, row_max + log(row_sum)   # 0 and -inf where no key is kept")
#: normalize -> the pseudo-code of ``fold``'s (init, update, finish) (``kernel.source``; fill in
#: the value tile v)
STATE_TEXT = {"softmax": _SOFTMAX, "topk": _SOFTMAX,
              "sigmoid": ("state = SigmoidState()   # acc = 0",
                          "state.update(s, {v})   # acc += sigmoid(s) @ {v}", "out = acc")}
#: top-k's first pass and the keep rule of its second (fill in topk)
TOPK_TEXT = ("thr = K-th largest kept score of each row over the tiles below (TopkThreshold, "
             "running top-{topk}; -inf if fewer are kept)",
             "s = where(s >= thr, s, -inf)   # top-{topk}: every key tied at the K-th score kept")


class Rows(NamedTuple):
    """A finished state: ``out (..., rows, Dv)``; ``lse``, ``row_max``, ``inv_sum`` are
    ``(..., rows, 1)`` (None under sigmoid)."""

    out: object
    lse: object = None
    row_max: object = None
    inv_sum: object = None


class _State:
    def __init__(self, lead: tuple, value_dim: int, like, *, inplace: bool = False,
                 matmul=None):
        self.xp = namespace(like)
        self.lead, self.value_dim, self.inplace = tuple(lead), value_dim, inplace
        self.dtype, self.device = like.dtype, array_api_compat.device(like)
        self.acc = None
        self._exp_ = _exp_inplace(self.xp)
        self._matmul = matmul or operator.matmul

    def _zeros(self, width: int):
        return self.xp.zeros((*self.lead, width), dtype=self.dtype, device=self.device)


class SoftmaxState(_State):
    """Online softmax (FlashAttention): running row max ``m``, row sum ``l``, accumulator."""

    m = l_sum = None  # until the first update

    def update(self, s, v, keep=None, *, owned: bool = False) -> None:
        """Fold in a tile; ``owned``: ``s`` is a fresh writable array the state may overwrite
        (only with ``inplace``)."""
        xp = self.xp
        if keep is not None:
            s, owned = xp.where(keep, s, NEG_INF), True
        s_max = xp.max(s, axis=-1, keepdims=True)
        m_new = s_max if self.m is None else xp.maximum(self.m, s_max)
        m_safe = xp.where(m_new == NEG_INF, 0.0, m_new)
        if owned and self.inplace:
            s -= m_safe
            p = self._exp_(s)
        else:
            p = xp.exp(s - m_safe)
        pv, p_sum = self._matmul(p, v), xp.sum(p, axis=-1, keepdims=True)
        if self.m is None:
            self.l_sum, self.acc = p_sum, pv
        elif self.inplace:
            alpha = self._exp_(self.m - m_safe)
            self.l_sum *= alpha
            self.l_sum += p_sum
            self.acc *= alpha
            self.acc += pv
        else:
            alpha = xp.exp(self.m - m_safe)
            self.l_sum = self.l_sum * alpha + p_sum
            self.acc = self.acc * alpha + pv
        self.m = m_new

    def finish(self) -> Rows:
        """Out and lse, with the row max and 1/sum a recomputing backward needs."""
        xp = self.xp
        if self.m is None:
            rows = self._zeros(1)
            return Rows(self._zeros(self.value_dim), rows + NEG_INF, rows, rows)
        empty = self.l_sum == 0
        inv_sum = xp.where(empty, 0.0, 1.0 / xp.where(empty, 1.0, self.l_sum))
        lse = xp.where(empty, NEG_INF, self.m + xp.log(xp.where(empty, 1.0, self.l_sum)))
        return Rows(self.acc * inv_sum, lse, xp.where(empty, 0.0, self.m), inv_sum)


class SigmoidState(_State):
    """``Σ sigmoid(s)·v`` over the kept keys."""

    def __init__(self, lead: tuple, value_dim: int, like, *, inplace: bool = False,
                 matmul=None):
        super().__init__(lead, value_dim, like, inplace=inplace, matmul=matmul)
        self._sigmoid = sigmoid(self.xp)

    def update(self, s, v, keep=None, *, owned: bool = False) -> None:
        """Fold in a tile (``owned`` is accepted for symmetry with SoftmaxState)."""
        weights = self._sigmoid(s)
        if keep is not None:
            weights = self.xp.where(keep, weights, 0.0)
        pv = self._matmul(weights, v)
        if self.acc is None:
            self.acc = pv
        elif self.inplace:
            self.acc += pv
        else:
            self.acc = self.acc + pv

    def finish(self) -> Rows:
        return Rows(self._zeros(self.value_dim) if self.acc is None else self.acc)


class TopkThreshold:
    """First pass of top-k: the K largest kept scores of each row seen so far."""

    def __init__(self, topk: int, lead: tuple, like):
        self.xp = namespace(like)
        self.topk, self.lead, self.like = topk, tuple(lead), like
        self.best = None
        self._largest = _largest(self.xp)

    def update(self, s, keep=None) -> None:
        """Fold in a tile's scores ``(..., rows, cols)``."""
        xp = self.xp
        if keep is not None:
            s = xp.where(keep, s, NEG_INF)
        cand = s if self.best is None else xp.concat([self.best, s], axis=-1)
        self.best = self._largest(cand, min(self.topk, cand.shape[-1]))

    def value(self):
        """``(..., rows, 1)``: the K-th largest kept score, -inf where fewer than K are kept."""
        if self.best is None or self.best.shape[-1] < self.topk:
            return self.xp.full((*self.lead, 1), NEG_INF, dtype=self.like.dtype,
                                device=array_api_compat.device(self.like))
        return self.xp.min(self.best, axis=-1, keepdims=True)

    @staticmethod
    def keeps(s, threshold, keep=None):
        """The second pass's mask: kept and ``s >= threshold`` (every tie at the K-th kept)."""
        above = s >= threshold
        return above if keep is None else keep & above


def fold(node, lead: tuple, value_dim: int, like, tiles,
         matmul=None) -> tuple[Rows, object]:
    """``(Rows, top-k threshold or None)`` of a block of query rows of the fused ``node``
    (its ``normalize`` and ``topk``), states in place, in ``like``'s dtype: ``tiles()`` yields
    the block's key tiles ``(s, keep or None, v, owned)`` (``update``'s arguments) and is
    called a second time under top-k, whose first pass finds the threshold. ``matmul(p, v)``
    is the weights-times-values product (default ``p @ v``; the torch kernel's half types
    pass a mixed-precision one)."""
    threshold = None
    if node.score_mod is not None and node.score_mod.has(-math.inf):
        tiles = _dropping(tiles)
    if node.normalize == "topk":
        first = TopkThreshold(node.topk, lead, like)
        for s, keep, _, _ in tiles():
            first.update(s, keep)
        threshold = first.value()
    state_class = SigmoidState if node.normalize == "sigmoid" else SoftmaxState
    state = state_class(lead, value_dim, like, inplace=True, matmul=matmul)
    for s, keep, v, owned in tiles():
        if threshold is not None:
            keep = TopkThreshold.keeps(s, threshold, keep)
        state.update(s, v, keep, owned=owned)
    return state.finish(), threshold


def _dropping(tiles):
    """``tiles`` with the pairs whose score is -inf removed from ``keep`` (a score_mod's -inf
    that the IR could not move into the mask)."""
    def dropped():
        for s, keep, v, owned in tiles():
            finite = s > -math.inf
            yield s, finite if keep is None else (finite & keep), v, owned
    return dropped


def _exp_inplace(xp):
    """``exp`` writing into its argument where the library allows it (numpy, torch)."""
    if array_api_compat.is_numpy_namespace(xp):
        return lambda x: np.exp(x, out=x)
    if array_api_compat.is_torch_namespace(xp):
        return lambda x: x.exp_()
    return xp.exp


def sigmoid(xp):
    """The sigmoid function of namespace ``xp`` (the weights of normalize sigmoid)."""
    if array_api_compat.is_torch_namespace(xp):
        import torch

        return torch.sigmoid
    return lambda s: logistic(s, xp)


def _largest(xp):
    """``(x, k) ->`` the k largest entries of x's last axis, in any order."""
    if array_api_compat.is_numpy_namespace(xp):
        return lambda x, k: -np.partition(-x, k - 1, axis=-1)[..., :k]
    if array_api_compat.is_torch_namespace(xp):
        return lambda x, k: x.topk(k, dim=-1).values
    return lambda x, k: xp.flip(xp.sort(x, axis=-1), axis=-1)[..., :k]
