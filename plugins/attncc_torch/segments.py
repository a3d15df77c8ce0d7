"""Segments of a block plan for the fused-runs path (``runs.py``), and their mask tiles.

Most block plans keep, per query block, a few *runs* of consecutive key blocks: a band for a
sliding window, the document's own blocks for a document mask, a band plus some global columns
for Longformer and BigBird. Consecutive query blocks whose runs have equal lengths and move by a
constant stride form a *segment* (a band: stride = block size; a document: stride 0, merged into
one tall block), which one fused call per run serves. A run that instead grows by one query
block's rows per block (a *staircase*: causal attention with a prefix, a causal document) splits
into the keys every block reads and a triangle that one ``is_causal`` call over the segment's rows
as one tall block serves, where the plan and the mask show that the triangle is exactly causal.
Driven by the plan alone: no mask is recognised by name. ``run_mask`` builds the additive 0/-inf
tile of a call's runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import array_api_compat.torch as xp
import numpy as np
import torch

from attncc.lowering.env import Layout, plan_slices
from attncc.plan import EMPTY, FULL, PARTIAL
from attncc.spec.numeric import evaluate

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Run:
    """Key positions ``start + i*stride : ... + length + i*growth`` for the ``i``-th query block
    of a segment; ``masked`` when one of its blocks is PARTIAL. A growing run (``growth`` equal
    to the segment's rows, stride 0) is a causal triangle: block ``i`` reads the diagonal square
    ``i`` and the full ones before it (``calls``)."""

    start: int
    length: int
    stride: int
    masked: bool
    growth: int = 0


@dataclass(frozen=True)
class Segment:
    """``count`` query blocks of ``rows`` rows each, from row ``r0``, of batch ``b0:b0+nb`` and
    query heads ``hq0:hq0+nhq``: block ``i`` reads, for every run, that run's ``i``-th window."""

    b0: int
    nb: int
    hq0: int
    nhq: int
    r0: int
    rows: int
    count: int
    runs: tuple[Run, ...]


@dataclass(frozen=True)
class Call:
    """One fused call of a segment: the keys of ``runs`` side by side for the rows of ``seg``
    (the segment itself, or for a triangle its rows as one tall block, ``tall``), top-left
    causal where ``causal``."""

    seg: Segment
    runs: tuple[Run, ...]
    causal: bool = False


def calls(seg: Segment) -> list[Call]:
    """The fused calls of ``seg``: a lone block with several runs makes one call on their keys
    side by side, else one call per run (merged by log-sum-exp). A run every block reads whole
    (stride 0, unmasked) or a triangle serves the segment's rows as one tall block (its keys
    once, not once per block; a triangle top-left causal)."""
    if seg.count == 1 and len(seg.runs) > 1:
        return [Call(seg, seg.runs)]
    found = []
    for r in seg.runs:
        if seg.count > 1 and r.stride == 0 and (r.growth or not r.masked):
            block = tall(seg, r)
            found.append(Call(block, block.runs, bool(r.growth)))
        else:
            found.append(Call(seg, (r,)))
    return found


def _block_runs(row, bn: int, nk: int):
    """``[(start, length, masked)]`` in key positions of one query block's non-EMPTY blocks."""
    kept = np.nonzero(row != EMPTY)[0]
    runs = np.split(kept, np.nonzero(np.diff(kept) > 1)[0] + 1) if kept.size else []
    return [(int(r[0]) * bn, min(int(r[-1] + 1) * bn, nk) - int(r[0]) * bn,
             bool((row[r] == PARTIAL).any())) for r in runs]


def build_segments(plan, batch: int, kv_heads: int, group: int,
                   tril=None) -> list[Segment]:
    """The segments of ``plan``, per slice: maximal runs of consecutive query blocks whose key
    runs have equal lengths and starts moving by a constant stride, or (given ``tril``) a fixed
    start and lengths growing by one query block's rows.

    Where every stride is 0 (the blocks read the same keys) the blocks merge into one taller
    block. Growing runs become triangles (``_triangles``); ``tril(seg, run)`` tells, per block
    of ``seg``, whether the mask keeps exactly the lower triangle of the growing ``run``'s
    diagonal square (``causal_squares``). Query blocks with no key block get no segment (rows
    stay 0 with lse -inf).
    """
    bm, bn, nq, nk = plan.block_m, plan.block_n, plan.seq_q, plan.seq_k
    segments = []
    for sl in plan_slices(plan, batch, kv_heads, group):
        hq0, nhq = sl.h0 * group + sl.g0, sl.nh * sl.ng
        states = plan.states[sl.bp, sl.hp]
        blocks = []  # the segment being grown: (runs, rows) of consecutive query blocks
        for m in range(plan.num_q_blocks + 1):  # the last step closes the last segment
            last = m == plan.num_q_blocks
            runs = [] if last else _block_runs(states[m], bn, nk)
            rows = 0 if last else min((m + 1) * bm, nq) - m * bm
            if blocks and runs and _extends(blocks, runs, rows, bm, tril is not None):
                blocks.append((runs, rows))
                continue
            if blocks:
                seg = _segment(sl, hq0, nhq, m - len(blocks), blocks, bm)
                grows = any(r.growth for r in seg.runs)
                segments.extend(_triangles(seg, states, bn, tril) if grows else [seg])
            blocks = [(runs, rows)] if runs else []
    return segments


def _steps(a, b) -> list[tuple[int, int]]:
    """Per run, how far its start and its length move from block ``a`` to block ``b``."""
    return [(y[0] - x[0], y[1] - x[1]) for x, y in zip(a, b, strict=True)]


def _extends(blocks, runs, rows: int, bm: int, stairs: bool) -> bool:
    last, last_rows = blocks[-1]
    if len(runs) != len(last):
        return False
    steps = _steps(last, runs)
    if not all((s >= 0 and g == 0) or (stairs and s == 0 and g == bm) for s, g in steps):
        return False
    if len(blocks) > 1 and steps != _steps(blocks[-2][0], last):
        return False
    # a short (last) query block only joins blocks that read the same keys (merged rows)
    return last_rows == bm and (rows == bm or not any(s or g for s, g in steps))


def _segment(sl, hq0: int, nhq: int, m0: int, blocks, bm: int) -> Segment:
    first = blocks[0][0]
    steps = _steps(first, blocks[1][0]) if len(blocks) > 1 else [(0, 0)] * len(first)
    runs = tuple(Run(r[0], r[1], s, any(b[0][j][2] for b in blocks), g)
                 for j, (r, (s, g)) in enumerate(zip(first, steps, strict=True)))
    if not any(s or g for s, g in steps):  # same keys for every block: one block of all rows
        return Segment(sl.b0, sl.nb, hq0, nhq, m0 * bm, sum(r for _, r in blocks), 1, runs)
    return Segment(sl.b0, sl.nb, hq0, nhq, m0 * bm, bm, len(blocks), runs)


def _triangles(seg: Segment, states, bn: int, tril) -> list[Segment]:
    """``seg`` (with growing runs) as maximal segments of consecutive blocks in which each
    growing run is a triangle: block ``i`` keeps the lower triangle of its diagonal square
    (``tril``) and FULL blocks between the sub-segment's first diagonal and its own. There each
    growing run splits into the keys before that first diagonal (stride 0, ``masked`` from the
    plan) and the triangle (a growing run of ``rows`` keys, unmasked); a block that is no part
    of such a sub-segment of two or more blocks is a segment of its own."""
    m0, count, rows = seg.r0 // seg.rows, seg.count, seg.rows
    grow = [r for r in seg.runs if r.growth]
    # each diagonal square a whole number of key blocks, block 0's inside its run
    if rows % bn or any(r.length < rows or (r.start + r.length - rows) % bn for r in grow):
        return split(seg)
    edges = [(r.start + r.length - rows) // bn for r in grow]  # block 0's diagonal, key block
    square = rows // bn  # key blocks per diagonal square
    # full[g][i, j]: square j of growing run g is FULL for block i
    full = [(states[m0:m0 + count, e:e + count * square] == FULL)
            .reshape(count, count, square).all(-1) for e in edges]
    good = np.logical_and.reduce([np.broadcast_to(tril(seg, r), (count,)) for r in grow])
    out, s = [], 0
    while s < count:
        e = s + 1
        while e < count and good[e] and all(f[e, s:e].all() for f in full):
            e += 1
        if e - s < 2 or not good[s]:
            out.extend(split(_blocks(seg, s, s + 1)))
            s += 1
            continue
        part, runs = _blocks(seg, s, e), []
        for r in part.runs:
            if not r.growth:
                runs.append(r)
                continue
            edge = (r.start + r.length - rows) // bn
            if edge > r.start // bn:
                rect = states[m0 + s:m0 + e, r.start // bn:edge]
                runs.append(Run(r.start, edge * bn - r.start, 0, bool((rect == PARTIAL).any())))
            runs.append(Run(edge * bn, rows, 0, False, rows))
        out.append(replace(part, runs=tuple(runs)))
        s = e
    return out


def _blocks(seg: Segment, s: int, e: int) -> Segment:
    """Blocks ``s:e`` of ``seg``."""
    return Segment(seg.b0, seg.nb, seg.hq0, seg.nhq, seg.r0 + s * seg.rows, seg.rows, e - s,
                   tuple(Run(r.start + s * r.stride, r.length + s * r.growth, r.stride, r.masked,
                             r.growth) for r in seg.runs))


def split(seg: Segment) -> list[Segment]:
    """``seg`` as one segment per query block (a growing run's diagonal masked)."""
    return [Segment(seg.b0, seg.nb, seg.hq0, seg.nhq, seg.r0 + i * seg.rows, seg.rows, 1,
                    tuple(Run(r.start + i * r.stride, r.length + i * r.growth, 0,
                              r.masked or bool(r.growth)) for r in seg.runs))
            for i in range(seg.count)]


def tall(seg: Segment, run: Run) -> Segment:
    """The rows of ``seg`` as one block that reads every key of the growing ``run``."""
    keys = Run(run.start, run.length + (seg.count - 1) * run.growth, 0, run.masked)
    return Segment(seg.b0, seg.nb, seg.hq0, seg.nhq, seg.r0, seg.count * seg.rows, 1, (keys,))


def causal_squares(mask, sizes: dict, inputs: dict, device, seg: Segment, run: Run):
    """Per block of ``seg`` (bool ``(count,)``, or ``(1,)`` for all), whether ``mask`` keeps
    exactly the lower triangle (diagonal included) of the growing ``run``'s diagonal square:
    with FULL blocks left of it, the block's share of a tall top-left causal call."""
    diagonal = Run(run.start + run.length - seg.rows, seg.rows, seg.rows, True)
    keep = run_keep(mask, seg, (diagonal,), sizes, inputs, device)
    tril = torch.ones(seg.rows, seg.rows, dtype=torch.bool, device=device).tril()
    return (keep == tril).flatten(1).all(-1).cpu().numpy()


#: Where b, h, q_idx, kv_idx sit in a run's tile ``(count, nhq, rows, length)``.
LAYOUT = Layout(4, b=(0,), h=(1,), q_idx=(0, 2), kv_idx=(0, 3))


def run_env(seg: Segment, runs: tuple[Run, ...], b0: int, sizes: dict, inputs: dict, device):
    """The environment of ``runs`` of a segment side by side (one call's keys), batch ``b0``."""
    ar = lambda a, b: torch.arange(a, b, device=device)  # noqa: E731
    blocks = ar(0, seg.count)[:, None]
    fixed = LAYOUT.fixed(sizes, inputs, ar(b0, b0 + 1), ar(seg.hq0, seg.hq0 + seg.nhq))
    kv = positions(runs, seg.count, device)
    return LAYOUT.env(fixed, seg.r0 + blocks * seg.rows + ar(0, seg.rows), kv), kv.shape[-1]


def positions(runs: tuple[Run, ...], count: int, device):
    """The key positions ``(count, length)`` of one call's keys (``runs._keys``), block by
    block: the windows of one run, or several runs of a lone block side by side."""
    block = torch.arange(count, device=device)[:, None]
    return torch.cat([r.start + block * r.stride + torch.arange(r.length, device=device)
                      for r in runs], dim=-1)


def run_keep(mask, seg: Segment, runs: tuple[Run, ...], sizes: dict, inputs: dict, device):
    """``mask`` (bool, ``(count|1, nhq|1, rows, length)``) over ``runs`` of a segment side by
    side (one call's keys); equal tiles of all blocks (a translation-invariant band) are stored
    once. A mask that reads b has one batch entry per slice (nb = 1); otherwise b is unused."""
    env, length = run_env(seg, runs, seg.b0, sizes, inputs, device)
    keep = as_tile(evaluate(mask, env, xp), 4, device)
    keep = torch.broadcast_to(keep, (*keep.shape[:2], seg.rows, length))
    if keep.shape[0] > 1 and bool((keep == keep[:1]).all()):
        keep = keep[:1]
    return keep


def as_tile(value, ndim: int, device=None, dtype=None):
    """An evaluated expression (a Python scalar, or a tensor of at most ``ndim`` dims, as
    ``evaluate`` gives over a ``Layout``) as a tensor of ``ndim`` dims, size-1 dims leading."""
    x = torch.as_tensor(value, dtype=dtype, device=device)
    return x if x.dim() == ndim else x.reshape((1,) * (ndim - x.dim()) + tuple(x.shape))


def run_mask(mask, seg: Segment, runs: tuple[Run, ...], sizes: dict, inputs: dict, dtype,
             device):
    """``(additive mask (count|1, nhq|1, rows, length), dead rows (count|1, nhq|1, rows))`` of
    ``run_keep``: 0 where ``mask`` keeps a pair, -inf where it drops it; a dead row keeps no
    pair."""
    keep = run_keep(mask, seg, runs, sizes, inputs, device)
    mask = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, NEG_INF)
    return mask, ~keep.any(-1)
