"""One tile of scores: raw score, score_mod and mask, evaluated on broadcast index arrays.

Arrays are five-dimensional, ``(B', Hkv', G', rows, cols)``: the query heads of one kv head sit on
their own axis (G', the group) so that keys and values ``(B', Hkv', 1, cols, D)`` broadcast over
them instead of being copied per query head. ``b`` and ``h`` are integer arrays that broadcast the
same way, so ``slope[h]`` or ``lengths[b]`` index the inputs exactly as the reference does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attncc.spec.numeric import evaluate


@dataclass(frozen=True)
class Slice:
    """A group of (batch, head) slices that share one block plan slice.

    ``b`` is ``(B', 1, 1, 1, 1)`` and ``h`` ``(1, Hkv', G', 1, 1)``, the global batch and query-head
    numbers; ``kv`` selects the slices' kv heads; ``q``, ``k``, ``v`` are views of the inputs for
    these slices; ``w`` is the additive score's weight ``(1, Hkv', G', 1, 1, D)`` or None.
    """

    b: np.ndarray
    h: np.ndarray
    kv: slice
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    w: np.ndarray | None = None


class TileScorer:
    """Computes score tiles for one spec and one call (sizes and inputs bound)."""

    def __init__(self, spec, sizes: dict, inputs: dict, scale: float, dtype):
        self.spec = spec
        self.base_env = {**sizes, **inputs}
        self.scale = dtype.type(scale)
        self.dtype = dtype

    def raw(self, sl: Slice, q_tile, k_tile):
        """Scores before score_mod: ``scale·q·kᵀ`` or ``Σ_d w[h,d]·tanh(q_d + k_d)``."""
        if self.spec.score == "additive":
            hidden = np.tanh(q_tile[..., :, None, :] + k_tile[..., None, :, :])
            return (hidden * sl.w).sum(axis=-1)
        return self.scale * (q_tile @ np.swapaxes(k_tile, -1, -2))

    def env(self, sl: Slice, rows: range, cols: range) -> dict:
        """The expression environment of a tile: sizes, inputs and the four index arrays."""
        return {**self.base_env, "b": sl.b, "h": sl.h,
                "q_idx": np.arange(rows.start, rows.stop).reshape(1, 1, 1, -1, 1),
                "kv_idx": np.arange(cols.start, cols.stop).reshape(1, 1, 1, 1, -1)}

    def modded(self, s, env: dict):
        """``score_mod`` applied to the tile (identity when the spec has none)."""
        if self.spec.score_mod is None:
            return s
        value = evaluate(self.spec.score_mod, {**env, "score": s}, np)
        return np.broadcast_to(np.asarray(value, dtype=self.dtype), s.shape)

    def keep(self, env: dict, shape: tuple):
        """The mask of a PARTIAL tile as a boolean array broadcast to ``shape``."""
        return np.broadcast_to(np.asarray(evaluate(self.spec.mask, env, np)), shape)
