"""The fused (flash) kernel: online softmax / sigmoid / top-k over the FULL and PARTIAL blocks.

For each group of (batch, head) slices that share a slice of the block plan (all of them when the
plan is shared, Bp = Hp = 1), and each query block ``m``::

    [top-k: a first pass over the same tiles finds each row's K-th largest kept score]
    state = init()                               # attncc.lowering.states
    [memory tile: all keys kept, no score_mod]   # memory_tokens > 0
    for n in full blocks of m:  state.update(score_mod(q·kᵀ))          # mask skipped
    for n in partial blocks of m: state.update(score_mod(q·kᵀ), keep=mask)
    out[m], lse[m] = state.finish()

EMPTY blocks are never touched. ``Stats`` counts what was visited, for tests and benchmarks.
``NORMALIZE`` pairs each normalization with its state class and the pseudo-code of its steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attncc.lowering.env import shared_kv, split_heads
from attncc.lowering.states import SigmoidState, SoftmaxState, TopkThreshold
from attncc_numpy.tiles import LAYOUT, Slice, TileScorer

_SOFTMAX = ("state = SoftmaxState()   # online softmax: row_max = -inf, row_sum = 0, acc = 0",
            "state.update(s, v[cols])   # p = exp(s - new_max); alpha = exp(row_max - new_max); "
            "row_sum = alpha * row_sum + rowsum(p); acc = alpha * acc + p @ v[cols]",
            "out[rows], lse[rows] = acc / row_sum, row_max + log(row_sum)   "
            "# 0 and -inf where no key is kept")

#: normalize -> (state class, (init, update, finish) pseudo-code)
NORMALIZE = {
    "softmax": (SoftmaxState, _SOFTMAX),
    "topk": (SoftmaxState, _SOFTMAX),
    "sigmoid": (SigmoidState, ("state = SigmoidState()   # acc = 0",
                               "state.update(s, v[cols])   # acc += sigmoid(s) @ v[cols]",
                               "out[rows] = acc")),
}

#: the top-k steps: the first pass, and the keep rule of the second
TOPK = ("thr = K-th largest kept score of each row over the tiles below (TopkThreshold, "
        "running top-{topk}; -inf if fewer are kept)",
        "s = where(s >= thr, s, -inf)   # top-{topk}: every key tied at the K-th score kept")


@dataclass
class Stats:
    """Tiles visited by the last call (memory tiles not counted)."""

    full: int = 0
    partial: int = 0

    @property
    def tiles(self) -> int:
        return self.full + self.partial


def run_fused(node, plan, scorer: TileScorer, q, k, v, stats: Stats):
    """Output ``(B, Hq, Nq, Dv)`` and lse ``(B, Hq, Nq)`` (None for sigmoid) of the fused kernel.

    ``q, k, v`` are already in the compute dtype (and k, v projected for linformer).
    """
    batch, heads, seq_q, _ = q.shape
    kv_heads, value_dim = k.shape[1], v.shape[-1]
    group = heads // kv_heads
    q5, k5, v5 = split_heads(q, kv_heads), shared_kv(k), shared_kv(v)
    out = np.zeros((batch, kv_heads, group, seq_q, value_dim), dtype=q.dtype)
    lse = np.full((batch, kv_heads, group, seq_q), -np.inf, dtype=q.dtype)
    every_head = np.arange(heads).reshape(kv_heads, group)
    bp_count, hp_count = plan.states.shape[:2]
    for bp in range(bp_count):
        bsel = slice(None) if bp_count == 1 else slice(bp, bp + 1)
        for hp in range(hp_count):
            if hp_count == 1:
                kv, g, h = slice(None), slice(None), every_head
            else:
                kv, g = slice(hp // group, hp // group + 1), slice(hp % group, hp % group + 1)
                h = np.full((1, 1), hp)
            sl = scorer.slice(np.arange(batch)[bsel], h, kv, q5[bsel, kv, g], k5[bsel, kv],
                              v5[bsel, kv])
            out[bsel, kv, g], lse_part = _run_slice(node, plan, scorer, sl, bp, hp, stats)
            if lse_part is not None:
                lse[bsel, kv, g] = lse_part
    out = out.reshape(batch, heads, seq_q, value_dim)
    if node.normalize == "sigmoid":
        return out, None
    return out, lse.reshape(batch, heads, seq_q)


def _run_slice(node, plan, scorer, sl: Slice, bp: int, hp: int, stats: Stats):
    seq_q, block_m = sl.q.shape[-2], plan.block_m
    state_class = NORMALIZE[node.normalize][0]
    mem = _slice_memory(sl, scorer.inputs) if node.memory_tokens else None
    outs, lses = [], []
    for m in range((seq_q + block_m - 1) // block_m):
        rows = range(m * block_m, min((m + 1) * block_m, seq_q))
        q_tile = sl.q[..., rows.start:rows.stop, :]
        block = (plan, scorer, sl, bp, hp, m, rows, q_tile, mem)
        lead = q_tile.shape[:-1]
        threshold = None
        if node.normalize == "topk":
            first = TopkThreshold(node.topk, lead, q_tile)
            for s, keep, _, _ in _tiles(*block, None):
                first.update(s, keep)
            threshold = first.value()
        state = state_class(lead, sl.v.shape[-1], q_tile, inplace=True)
        for s, keep, v_tile, owned in _tiles(*block, stats):
            if threshold is not None:
                keep = TopkThreshold.keeps(s, threshold, keep)
            state.update(s, v_tile, keep, owned=owned)
        result = state.finish()
        outs.append(result.out)
        lses.append(result.lse)
    out = np.concatenate(outs, axis=-2)
    return out, (None if lses[0] is None else np.concatenate(lses, axis=-2)[..., 0])


def _tiles(plan, scorer, sl: Slice, bp: int, hp: int, m: int, rows: range, q_tile, mem, stats):
    """``(scores, keep or None, values, owned)`` of query block ``m``'s tiles: the memory tile
    first, then the FULL blocks (no mask work), then the PARTIAL ones; counted in ``stats``
    unless None. ``owned``: the scores are a fresh array the state may overwrite."""
    modded = scorer.node.score_mod is not None
    if mem is not None:
        yield scorer.raw(sl, q_tile, mem[0]), None, mem[1], True
    full, partial = plan.kv_blocks(bp, hp, m)
    seq_k, block_n = sl.k.shape[-2], plan.block_n
    q_idx = LAYOUT.place("q_idx", np.arange(rows.start, rows.stop))
    for n, is_full in [(int(n), True) for n in full] + [(int(n), False) for n in partial]:
        start, stop = n * block_n, min((n + 1) * block_n, seq_k)
        s = scorer.raw(sl, q_tile, sl.k[..., start:stop, :])
        env = None
        if modded or not is_full:
            env = {**sl.fixed, "q_idx": q_idx, "kv_idx": scorer.kv_idx(start, stop)}
        if modded:
            s = scorer.modded(s, env)
        if stats is not None:
            stats.full += is_full
            stats.partial += not is_full
        keep = None if is_full else scorer.keep(env, s.shape)
        yield s, keep, sl.v[..., start:stop, :], not modded


def _slice_memory(sl: Slice, inputs: dict):
    """Memory keys and values of the slice's kv heads, ``(1, Hkv', 1, M, D)``."""
    return inputs["mem_k"][sl.kv][None, :, None], inputs["mem_v"][sl.kv][None, :, None]
