"""The fused (flash) kernel: online softmax / sigmoid / top-k over the FULL and PARTIAL blocks.

For each group of (batch, head) slices that share a slice of the block plan (all of them when the
plan is shared, Bp = Hp = 1), and each query block ``m``::

    [top-k: a first pass over the same tiles finds each row's K-th largest kept score]
    state = init()                               # running max/sum/acc
    [memory tile: all keys kept, no score_mod]   # memory_tokens > 0
    for n in full blocks of m:  state.update(score_mod(q·kᵀ), keep=None)      # mask skipped
    for n in partial blocks of m: state.update(score_mod(q·kᵀ), keep=mask)
    out[m], lse[m] = state.finish()

EMPTY blocks are never touched. ``Stats`` counts what was visited, for tests and ``source``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attncc_numpy.states import SigmoidState, SoftmaxState, TopkThreshold
from attncc_numpy.tiles import Slice, TileScorer


@dataclass
class Stats:
    """Tiles visited by the last call (memory tiles not counted)."""

    full: int = 0
    partial: int = 0

    @property
    def tiles(self) -> int:
        return self.full + self.partial


def run_fused(spec, plan, scorer: TileScorer, q, k, v, inputs: dict, stats: Stats):
    """Output ``(B, Hq, Nq, Dv)`` and lse ``(B, Hq, Nq)`` (None for sigmoid) of the fused kernel.

    ``q, k, v`` are already in the compute dtype (and k, v projected for linformer).
    """
    batch, heads, seq_q, head_dim = q.shape
    kv_heads, value_dim = k.shape[1], v.shape[-1]
    group = heads // kv_heads
    q5 = q.reshape(batch, kv_heads, group, seq_q, head_dim)
    k5, v5 = k[:, :, None], v[:, :, None]
    out = np.zeros((batch, kv_heads, group, seq_q, value_dim), dtype=q.dtype)
    lse = np.full((batch, kv_heads, group, seq_q), -np.inf, dtype=q.dtype)
    bp_count, hp_count = plan.states.shape[:2]
    for bp in range(bp_count):
        bsel = slice(None) if bp_count == 1 else slice(bp, bp + 1)
        for hp in range(hp_count):
            if hp_count == 1:
                hsel = (slice(None), slice(None))
                h = np.arange(heads).reshape(1, kv_heads, group, 1, 1)
            else:
                hsel = (slice(hp // group, hp // group + 1), slice(hp % group, hp % group + 1))
                h = np.full((1, 1, 1, 1, 1), hp)
            b = np.arange(batch)[bsel].reshape(-1, 1, 1, 1, 1)
            kv_sel = (bsel, hsel[0])
            sl = Slice(b=b, h=h, kv=hsel[0], q=q5[bsel, hsel[0], hsel[1]], k=k5[kv_sel],
                       v=v5[kv_sel], w=_additive_weight(spec, inputs, h, q.dtype))
            o, lse_part = _run_slice(spec, plan, scorer, sl, bp, hp, inputs, stats)
            out[bsel, hsel[0], hsel[1]] = o
            if lse_part is not None:
                lse[bsel, hsel[0], hsel[1]] = lse_part
    out = out.reshape(batch, heads, seq_q, value_dim)
    if spec.normalize == "sigmoid":
        return out, None
    return out, lse.reshape(batch, heads, seq_q)


def _additive_weight(spec, inputs, h, dtype):
    if spec.score != "additive":
        return None
    w = np.asarray(inputs["w"], dtype=dtype)
    return w[h[..., 0, 0]][..., None, None, :]


def _run_slice(spec, plan, scorer, sl: Slice, bp: int, hp: int, inputs: dict, stats: Stats):
    seq_q, block_m = sl.q.shape[-2], plan.block_m
    lead, dtype = sl.q.shape[:3], sl.q.dtype
    mem = _slice_memory(sl, inputs, dtype) if spec.memory_tokens else None
    outs, lses = [], []
    for m in range((seq_q + block_m - 1) // block_m):
        rows = range(m * block_m, min((m + 1) * block_m, seq_q))
        shape = (*lead, len(rows))
        threshold = None
        if spec.normalize == "topk":
            first = TopkThreshold(shape, spec.topk, dtype)
            for s, keep, _ in _tiles(spec, plan, scorer, sl, bp, hp, m, rows, mem, None):
                first.update(s, keep)
            threshold = first.value()[..., None]
        state = (SigmoidState if spec.normalize == "sigmoid" else SoftmaxState)(
            shape, sl.v.shape[-1], dtype)
        for s, keep, v_tile in _tiles(spec, plan, scorer, sl, bp, hp, m, rows, mem, stats):
            if threshold is not None:
                above = s >= threshold
                keep = above if keep is None else keep & above
            state.update(s, keep, v_tile)
        o, lse = state.finish()
        outs.append(o)
        lses.append(lse)
    lse = None if spec.normalize == "sigmoid" else np.concatenate(lses, axis=-1)
    return np.concatenate(outs, axis=-2), lse


def _tiles(spec, plan, scorer, sl: Slice, bp: int, hp: int, m: int, rows: range, mem, stats):
    """``(scores, keep or None, values)`` of query block ``m``'s tiles: the memory tile first, then
    the FULL blocks (no mask work), then the PARTIAL ones; counted in ``stats`` unless None."""
    q_tile = sl.q[..., rows.start:rows.stop, :]
    if mem is not None:
        yield scorer.raw(sl, q_tile, mem[0]), None, mem[1]
    full, partial = plan.kv_blocks(bp, hp, m)
    seq_k, block_n = sl.k.shape[-2], plan.block_n
    for n, is_full in [(int(n), True) for n in full] + [(int(n), False) for n in partial]:
        cols = range(n * block_n, min((n + 1) * block_n, seq_k))
        s = scorer.raw(sl, q_tile, sl.k[..., cols.start:cols.stop, :])
        env = scorer.env(sl, rows, cols) if (spec.score_mod is not None or not is_full) else None
        if spec.score_mod is not None:
            s = scorer.modded(s, env)
        if stats is not None:
            stats.full += is_full
            stats.partial += not is_full
        keep = None if is_full else scorer.keep(env, s.shape)
        yield s, keep, sl.v[..., cols.start:cols.stop, :]


def _slice_memory(sl: Slice, inputs: dict, dtype):
    """Memory keys and values of the slice's kv heads, ``(1, Hkv', 1, M, D)``."""
    mem_k = np.asarray(inputs["mem_k"], dtype=dtype)[sl.kv][None, :, None]
    mem_v = np.asarray(inputs["mem_v"], dtype=dtype)[sl.kv][None, :, None]
    return mem_k, mem_v



