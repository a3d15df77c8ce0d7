"""Segments of a block plan for the fused-runs path (``runs.py``), and their mask tiles.

Most block plans keep, per query block, a few *runs* of consecutive key blocks: a band for a
sliding window, the document's own blocks for a document mask, a band plus some global columns
for Longformer and BigBird. Consecutive query blocks whose runs have equal lengths and move by a
constant stride form a *segment* (a band: stride = block size; a document: stride 0, merged into
one tall block), which one fused call per run serves. Driven by the plan alone: no mask is
recognised by name. ``run_mask`` builds the additive 0/-inf tile of a call's runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import array_api_compat.torch as xp
import numpy as np
import torch

from attncc.lowering.env import Layout, plan_slices
from attncc.plan import EMPTY, PARTIAL
from attncc.spec.numeric import evaluate

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Run:
    """Key positions ``start + i*stride : ... + length`` for the ``i``-th query block of a
    segment; ``masked`` when one of its blocks is PARTIAL."""

    start: int
    length: int
    stride: int
    masked: bool


@dataclass(frozen=True)
class Segment:
    """``count`` query blocks of ``rows`` rows each, from row ``r0``, of batch ``b0:b0+nb`` and
    query heads ``hq0:hq0+nhq``: block ``i`` reads, for every run, that run's ``i``-th window.

    One fused call per run serves the whole segment: the blocks become the batch axis of
    overlapping zero-copy ``as_strided`` windows of q, k and v."""

    b0: int
    nb: int
    hq0: int
    nhq: int
    r0: int
    rows: int
    count: int
    runs: tuple[Run, ...]


def _block_runs(row, bn: int, nk: int):
    """``[(start, length, masked)]`` in key positions of one query block's non-EMPTY blocks."""
    kept = np.nonzero(row != EMPTY)[0]
    runs = np.split(kept, np.nonzero(np.diff(kept) > 1)[0] + 1) if kept.size else []
    return [(int(r[0]) * bn, min(int(r[-1] + 1) * bn, nk) - int(r[0]) * bn,
             bool((row[r] == PARTIAL).any())) for r in runs]


def build_segments(plan, batch: int, kv_heads: int, group: int) -> list[Segment]:
    """The segments of ``plan``, per slice: maximal runs of consecutive query blocks whose key
    runs have equal lengths and starts moving by a constant stride.

    Where every stride is 0 (the blocks read the same keys) the blocks merge into one taller
    block. Query blocks with no key block get no segment (rows stay 0 with lse -inf).
    """
    bm, bn, nq, nk = plan.block_m, plan.block_n, plan.seq_q, plan.seq_k
    segments = []
    for sl in plan_slices(plan, batch, kv_heads, group):
        hq0, nhq = sl.h0 * group + sl.g0, sl.nh * sl.ng
        blocks = []  # the segment being grown: (runs, rows) of consecutive query blocks
        for m in range(plan.num_q_blocks):
            runs = _block_runs(plan.states[sl.bp, sl.hp, m], bn, nk)
            rows = min((m + 1) * bm, nq) - m * bm
            if blocks and runs and _extends(blocks, runs, rows, bm):
                blocks.append((runs, rows))
                continue
            if blocks:
                segments.append(_segment(sl, hq0, nhq, m - len(blocks), blocks, bm))
            blocks = [(runs, rows)] if runs else []
        if blocks:
            segments.append(_segment(sl, hq0, nhq, plan.num_q_blocks - len(blocks), blocks, bm))
    return segments


def _strides(a, b) -> list[int]:
    return [y[0] - x[0] for x, y in zip(a, b, strict=True)]


def _extends(blocks, runs, rows: int, bm: int) -> bool:
    last, last_rows = blocks[-1]
    if len(runs) != len(last) or any(a[1] != b[1] for a, b in zip(last, runs, strict=True)):
        return False
    strides = _strides(last, runs)
    if min(strides) < 0 or (len(blocks) > 1 and strides != _strides(blocks[-2][0], last)):
        return False
    # a short (last) query block only joins blocks that read the same keys (merged rows)
    return last_rows == bm and (rows == bm or not any(strides))


def _segment(sl, hq0: int, nhq: int, m0: int, blocks, bm: int) -> Segment:
    first = blocks[0][0]
    strides = _strides(first, blocks[1][0]) if len(blocks) > 1 else [0] * len(first)
    runs = tuple(Run(r[0], r[1], t, any(b[0][j][2] for b in blocks))
                 for j, (r, t) in enumerate(zip(first, strides, strict=True)))
    if not any(strides):  # same keys for every block: one block of all their rows
        return Segment(sl.b0, sl.nb, hq0, nhq, m0 * bm, sum(r for _, r in blocks), 1, runs)
    return Segment(sl.b0, sl.nb, hq0, nhq, m0 * bm, bm, len(blocks), runs)


#: Where b, h, q_idx, kv_idx sit in a run's tile ``(count, nhq, rows, length)``.
LAYOUT = Layout(4, b=(0,), h=(1,), q_idx=(0, 2), kv_idx=(0, 3))


def run_env(seg: Segment, runs: tuple[Run, ...], b0: int, sizes: dict, inputs: dict, device):
    """The environment of ``runs`` of a segment side by side (one call's keys), batch ``b0``."""
    ar = lambda a, b: torch.arange(a, b, device=device)  # noqa: E731
    blocks = ar(0, seg.count)[:, None]
    fixed = LAYOUT.fixed(sizes, inputs, ar(b0, b0 + 1), ar(seg.hq0, seg.hq0 + seg.nhq))
    kv = torch.cat([r.start + blocks * r.stride + ar(0, r.length) for r in runs], dim=-1)
    return LAYOUT.env(fixed, seg.r0 + blocks * seg.rows + ar(0, seg.rows), kv), kv.shape[-1]


def run_mask(mask, seg: Segment, runs: tuple[Run, ...], sizes: dict, inputs: dict, dtype,
             device):
    """``(additive mask (count|1, nhq|1, rows, length), dead rows (count|1, nhq|1, rows))`` of
    ``runs`` of a segment side by side (one call's keys): 0 where ``mask`` keeps a pair, -inf
    where it drops it; a dead row keeps no pair. Equal tiles of all blocks (a
    translation-invariant band) are stored once. A mask that reads b has one batch entry per
    slice (nb = 1); otherwise b is unused."""
    env, length = run_env(seg, runs, seg.b0, sizes, inputs, device)
    keep = evaluate(mask, env, xp)
    if isinstance(keep, bool):
        keep = torch.full((1, 1, 1, 1), keep, device=device)
    keep = torch.broadcast_to(keep, (*keep.shape[:2], seg.rows, length))
    if keep.shape[0] > 1 and bool((keep == keep[:1]).all()):
        keep = keep[:1]
    mask = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, NEG_INF)
    return mask, ~keep.any(-1)
