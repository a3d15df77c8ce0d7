"""The fused (flash) kernel: online softmax / sigmoid / top-k over the FULL and PARTIAL blocks.

For each group of (batch, head) slices that share a slice of the block plan
(``attncc.lowering.env.plan_slices``), and each query block ``m``::

    [top-k: a first pass over the same tiles finds each row's K-th largest kept score]
    state = init()                               # attncc.lowering.states.fold
    [memory tile: all keys kept, no score_mod]   # memory_tokens > 0
    for n in full blocks of m:  state.update(score_mod(q·kᵀ))          # mask skipped
    for n in partial blocks of m: state.update(score_mod(q·kᵀ), keep=mask)
    out[m], lse[m] = state.finish()

EMPTY blocks are never touched. Tiles are five-dimensional, ``(B', Hkv', G', rows, cols)``
(``LAYOUT``): the query heads of one kv head sit on their own axis (G', the group) so that keys
and values ``(B', Hkv', 1, cols, D)`` broadcast over them instead of being copied per query head.
The index environment comes from ``attncc.lowering.env.Layout``, so ``slope[h]`` or
``lengths[b]`` index the inputs as the reference does. ``Stats`` counts what was visited, for
tests and benchmarks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from attncc.lowering.env import (
    Layout,
    block_scores,
    plan_slices,
    raw_scores,
    shared_kv,
    split_heads,
)
from attncc.lowering.states import fold

LAYOUT = Layout(5, b=(0,), h=(1, 2), q_idx=(3,), kv_idx=(4,))

@dataclass
class Stats:
    """Tiles visited by the last call (memory tiles not counted)."""

    full: int = 0
    partial: int = 0

    @property
    def tiles(self) -> int:
        return self.full + self.partial


@dataclass(frozen=True)
class Slice:
    """Views of one plan slice's (batch, head) pairs: ``q``, ``k``, ``v``; ``fixed`` the index
    environment without positions (sizes, inputs, ``b`` and ``h``); ``w`` the additive score's
    weight ``(1, Hkv', G', 1, 1, D)`` and ``mem`` the memory keys and values
    ``(1, Hkv', 1, M, D)``, or None."""

    fixed: dict
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    w: np.ndarray | None
    mem: tuple | None


class TileScorer:
    """Computes score tiles of one fused node for one call (sizes and inputs bound)."""

    def __init__(self, node, sizes: dict, inputs: dict, scale: float, dtype, block_n: int):
        self.node, self.block_n = node, block_n
        self.sizes, self.inputs = sizes, inputs
        self.dtype = np.dtype(dtype)
        self.scale = self.dtype.type(scale)

    def slice(self, part, q5, k5, v5) -> Slice:
        """The ``Slice`` of plan slice ``part`` (``attncc.lowering.env.Slice``) of
        ``q5 (B, Hkv, G, Nq, D)`` and ``k5, v5 (B, Hkv, 1, Nk, D)``."""
        b, kv, g = part.index
        bs, h = part.indices(np, q5.shape[2])
        w = mem = None
        if self.node.score == "additive":
            w = self.inputs["w"][h][None, :, :, None, None, :]
        if self.node.memory_tokens:
            mem = tuple(self.inputs[n][kv][None, :, None] for n in ("mem_k", "mem_v"))
        return Slice(LAYOUT.fixed(self.sizes, self.inputs, bs, h), q5[b, kv, g], k5[b, kv],
                     v5[b, kv], w, mem)

    def tiles(self, sl: Slice, rows: slice, full, partial):
        """``(scores, keep or None, values, owned)`` of the tiles of query rows ``rows``: the
        memory tile first, then the FULL key blocks (no mask work), then the PARTIAL ones
        (``attncc.lowering.env.block_scores``). ``owned``: the scores are a fresh array the
        state may overwrite."""
        q_tile = sl.q[..., rows, :]
        if sl.mem is not None:
            yield raw_scores(q_tile, sl.mem[0], self.scale, sl.w), None, sl.mem[1], True
        q_idx = LAYOUT.place("q_idx", np.arange(rows.start, rows.stop))

        def env(start: int, stop: int) -> dict:
            return {**sl.fixed, "q_idx": q_idx, "kv_idx": _kv_positions(start, stop)}

        blocks = [(int(n), True) for n in full] + [(int(n), False) for n in partial]
        owned = self.node.score_mod is None
        for start, stop, s, keep in block_scores(self.node, q_tile, sl.k, self.scale, sl.w,
                                                 blocks, self.block_n, env, np):
            yield s, keep, sl.v[..., start:stop, :], owned


@functools.lru_cache(maxsize=4096)
def _kv_positions(start: int, stop: int):
    """Key positions ``[start, stop)`` on the tile's kv axis (built once, read only)."""
    return LAYOUT.place("kv_idx", np.arange(start, stop))


def run_fused(node, plan, scorer: TileScorer, q, k, v, stats: Stats):
    """Output ``(B, Hq, Nq, Dv)`` and lse ``(B, Hq, Nq)`` (None for sigmoid) of the fused kernel.

    ``q, k, v`` are already in the compute dtype (and k, v projected for linformer).
    """
    batch, heads, seq_q, _ = q.shape
    kv_heads, value_dim, bm = k.shape[1], v.shape[-1], plan.block_m
    q5, k5, v5 = split_heads(q, kv_heads), shared_kv(k), shared_kv(v)
    out = np.zeros((*q5.shape[:-1], value_dim), dtype=q.dtype)
    lse = np.full(q5.shape[:-1], -np.inf, dtype=q.dtype)
    for part in plan_slices(plan, batch, kv_heads, heads // kv_heads):
        sl = scorer.slice(part, q5, k5, v5)
        for m in range(plan.num_q_blocks):
            rows = slice(m * bm, min((m + 1) * bm, seq_q))
            full, partial = plan.kv_blocks(part.bp, part.hp, m)
            stats.full += len(full)
            stats.partial += len(partial)
            lead = (*sl.q.shape[:-2], rows.stop - rows.start)
            tiles = functools.partial(scorer.tiles, sl, rows, full, partial)
            done, _ = fold(node, lead, value_dim, sl.q, tiles)
            out[(*part.index, rows)] = done.out
            if done.lse is not None:
                lse[(*part.index, rows)] = done.lse[..., 0]
    out = out.reshape(batch, heads, seq_q, value_dim)
    return out, (None if node.normalize == "sigmoid" else lse.reshape(batch, heads, seq_q))
