"""Per-box minimum and maximum of an array over index ranges, vectorized: the bounds of an input
element ``x[i0, i1, ...]`` over every block box, given each index's interval per box.

An array's axes are reduced one at a time. The ranges ``lo..hi`` (inclusive) of one axis cut it
into elementary segments at every ``lo`` and ``hi + 1``; one ``reduceat`` gives each segment's
min/max (O(elements)); a sparse table over the segments (O(K log K) for K segments) then answers
each box's range as the min/max of two overlapping power-of-two spans. Ranges that are the
blocks of an index symbol are one segment each, so the common case is one ``reduceat`` and one
gather; points (``lo == hi``) are a gather alone.
"""

from __future__ import annotations

import numpy as np

__all__ = ["range_bounds"]

#: Leading axes of the box layout (b, h, q, kv) that every array here starts with.
BOX_AXES = 4


def range_bounds(table: np.ndarray, ranges: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
    """``(min, max)`` of ``table`` over ``table[lo0..hi0, lo1..hi1, ...]`` for every box.

    ``ranges[a]`` is ``(lo, hi)`` for axis ``a`` of ``table``: integer arrays that broadcast in the
    4-d box layout ``(b, h, q, kv)``, within ``0..table.shape[a] - 1``. Returns two arrays in
    that layout (broadcast over the boxes the ranges vary with), of ``table``'s dtype (bool as
    int8).
    """
    if table.dtype == np.bool_:
        table = table.astype(np.int8)
    shaped = [tuple(np.asarray(b, dtype=np.int64).reshape(np.shape(b) or (1,) * BOX_AXES)
                    for b in pair) for pair in ranges]
    lo_t = hi_t = table.reshape((1,) * BOX_AXES + table.shape)
    remaining = list(range(table.ndim))
    # axes whose ranges vary with fewer boxes first: the result grows by the boxes, shrinks by
    # the axis
    for axis in sorted(remaining, key=lambda a: np.broadcast(*shaped[a]).size):
        pos = BOX_AXES + remaining.index(axis)
        lo, hi = np.broadcast_arrays(*shaped[axis])
        lo_t = _reduce(lo_t, pos, lo, hi, np.minimum)
        hi_t = _reduce(hi_t, pos, lo, hi, np.maximum)
        remaining.remove(axis)
    return lo_t, hi_t


def _reduce(t: np.ndarray, pos: int, lo: np.ndarray, hi: np.ndarray, fn) -> np.ndarray:
    """``fn``-reduction of ``t`` over ``lo..hi`` of its axis ``pos``, per box; drops that axis."""
    if np.array_equal(lo, hi):
        return _gather(t, pos, lo)
    first, last = int(lo.min()), int(hi.max())
    bounds = np.unique(np.concatenate([lo.ravel(), hi.ravel() + 1]))
    window = [slice(None)] * t.ndim
    window[pos] = slice(first, last + 1)
    level = fn.reduceat(t[tuple(window)], bounds[:-1] - first, axis=pos)
    start = np.searchsorted(bounds, lo)
    end = np.searchsorted(bounds, hi + 1) - 1  # the last segment of each range
    rank = np.floor(np.log2(end - start + 1)).astype(np.int64)  # span 2**rank covers half
    result = None
    for k in range(int(rank.max()) + 1):
        if k:  # level k: fn over segments i .. i + 2**k - 1
            span = 1 << (k - 1)
            head, tail = ([slice(None)] * t.ndim for _ in range(2))
            head[pos], tail[pos] = slice(0, level.shape[pos] - span), slice(span, None)
            level = fn(level[tuple(head)], level[tuple(tail)])
        chosen = rank == k
        if not chosen.any():
            continue
        width = 1 << k
        part = fn(_gather(level, pos, np.where(chosen, start, 0)),
                  _gather(level, pos, np.where(chosen, end - width + 1, 0)))
        pick = chosen.reshape(chosen.shape + (1,) * (part.ndim - BOX_AXES))
        result = part if result is None else np.where(pick, part, result)
    return result


def _gather(t: np.ndarray, pos: int, index: np.ndarray) -> np.ndarray:
    """``t[..., index[box], ...]`` along axis ``pos`` for every box (the axis dropped)."""
    shape = list(index.shape) + [1] * (t.ndim - BOX_AXES)
    picked = np.take_along_axis(t, index.reshape(shape), axis=pos)
    return np.squeeze(picked, axis=pos)
