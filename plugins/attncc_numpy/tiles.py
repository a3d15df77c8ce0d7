"""One tile of scores: raw score, score_mod and mask, evaluated on broadcast index arrays.

Arrays are five-dimensional, ``(B', Hkv', G', rows, cols)`` (``LAYOUT``): the query heads of one
kv head sit on their own axis (G', the group) so that keys and values ``(B', Hkv', 1, cols, D)``
broadcast over them instead of being copied per query head. The index environment comes from
``attncc.lowering.env.Layout``, so ``slope[h]`` or ``lengths[b]`` index the inputs as the
reference does.

``SCORES`` pairs each score kind with the function that computes it and the pseudo-code line
``kernel.source`` prints for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attncc.lowering.env import Layout
from attncc.spec.numeric import evaluate

LAYOUT = Layout(5, b=(0,), h=(1, 2), q_idx=(3,), kv_idx=(4,))


def _dot(scorer, sl, q_tile, k_tile):
    return scorer.scale * (q_tile @ np.swapaxes(k_tile, -1, -2))


def _additive(scorer, sl, q_tile, k_tile):
    hidden = np.tanh(q_tile[..., :, None, :] + k_tile[..., None, :, :])
    return (hidden * sl.w).sum(axis=-1)


#: score kind -> (tile function, source text with ``{scale}`` and ``{k}`` to fill in)
SCORES = {"dot": (_dot, "({scale}) * q[rows] @ {k}.T"),
          "additive": (_additive, "sum(w[h, :] * tanh(q[rows, None, :] + {k}[None, :, :]), "
                                  "axis=-1)")}


@dataclass(frozen=True)
class Slice:
    """A group of (batch, head) slices that share one block plan slice.

    ``fixed`` is the index environment without positions (sizes, inputs, ``b`` and ``h``);
    ``kv`` selects the slices' kv heads; ``q``, ``k``, ``v`` are views of the inputs for these
    slices; ``w`` is the additive score's weight ``(1, Hkv', G', 1, 1, D)`` or None.
    """

    fixed: dict
    kv: slice
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    w: np.ndarray | None = None


class TileScorer:
    """Computes score tiles of one fused node for one call (sizes and inputs bound)."""

    def __init__(self, node, sizes: dict, inputs: dict, scale: float, dtype):
        self.node = node
        self.sizes, self.inputs = sizes, inputs
        self.dtype = np.dtype(dtype)
        self.scale = self.dtype.type(scale)
        self._score = SCORES[node.score][0]
        self.mask = node.mask.expr if node.mask is not None else None
        self._kv_idx: dict = {}

    def slice(self, b, h, kv: slice, q, k, v) -> Slice:
        """The Slice of batch entries ``b (B',)`` and query heads ``h (Hkv', G')``."""
        w = None
        if self.node.score == "additive":
            w = self.inputs["w"][h][None, :, :, None, None, :]
        return Slice(LAYOUT.fixed(self.sizes, self.inputs, b, h), kv, q, k, v, w)

    def kv_idx(self, start: int, stop: int):
        """Key positions ``[start, stop)`` on the tile's kv axis (built once per call)."""
        placed = self._kv_idx.get((start, stop))
        if placed is None:
            placed = self._kv_idx[start, stop] = LAYOUT.place("kv_idx", np.arange(start, stop))
        return placed

    def raw(self, sl: Slice, q_tile, k_tile):
        """Scores before score_mod, a fresh array."""
        return self._score(self, sl, q_tile, k_tile)

    def modded(self, s, env: dict):
        """``score_mod`` applied to the tile (identity when the node has none)."""
        if self.node.score_mod is None:
            return s
        value = evaluate(self.node.score_mod, {**env, "score": s}, np)
        return np.broadcast_to(np.asarray(value, dtype=self.dtype), s.shape)

    def keep(self, env: dict, shape: tuple):
        """The mask of a PARTIAL tile as a boolean array broadcast to ``shape``."""
        return np.broadcast_to(np.asarray(evaluate(self.mask, env, np)), shape)
