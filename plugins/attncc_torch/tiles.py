"""The torch kernel's steps over a BlockPlan, and one tile of scores: gathers, raw score,
score_mod and mask on broadcast index tensors.

A *slice* (``attncc.lowering.env.Slice``) is the set of (batch, head) pairs that share one slice of
the plan. Inside a slice, query blocks with the same number of FULL and PARTIAL key blocks
form a *step*: their key blocks are gathered into one ``(G, c)`` index table and processed by one
batched matmul per kv chunk. EMPTY blocks appear in no table, so they cost nothing; in every row of
a table the FULL blocks come first, so the elementwise mask runs only on the columns after them.

When ``seq_k`` is not a multiple of ``block_n`` the last key block holds padding, so it is demoted
from FULL to PARTIAL (the padding is removed with the mask, on PARTIAL blocks only).

A step's tiles are five-dimensional, ``(nb, nh, G, R, C)``: batch entries, kv heads, query blocks,
rows (the ``ng`` query heads of a kv head times ``block_m`` positions) and columns (``c`` key blocks
times ``block_n`` positions). Queries of the heads sharing a kv head are stacked on the row axis, so
one gathered key tile serves all of them: K/V are never copied per query head. For expressions the
tile is viewed as ``(nb, nh, G, ng, block_m, c, block_n)`` and the index symbols are integer tensors
that broadcast against it (``attncc.lowering.env.Layout``), so ``slope[h]`` or ``doc[b, q_idx]``
index inputs as the reference does.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import array_api_compat.torch as xp
import numpy as np
import sympy
import torch
import torch.nn.functional as F  # noqa: N812 - the name torch code uses

from attncc.lowering.env import Layout, Slice, plan_slices, raw_scores
from attncc.plan import FULL, PARTIAL
from attncc.spec.numeric import evaluate
from attncc.spec.symbols import score


@dataclass(frozen=True)
class Chunk:
    """Key blocks ``kv (G, c)`` of one inner iteration; the first ``n_full`` columns are FULL."""

    kv: torch.Tensor
    n_full: int


@dataclass(frozen=True)
class Step:
    """Query blocks ``qblocks (G,)`` of one slice, with their key blocks split into chunks."""

    slice: Slice
    qblocks: torch.Tensor
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class Schedule:
    """Every step of one call; ``visited`` / ``total`` count key blocks (for the source text);
    ``tile_elems`` is the memory bound the steps were cut to (score elements)."""

    steps: tuple[Step, ...]
    visited: int
    total: int
    tile_elems: int


def build_schedule(plan, batch: int, kv_heads: int, group: int, *, kv_chunk: int,
                   group_blocks: int, tile_elems: int, value_cost: int, memory: bool,
                   device) -> Schedule:
    """The steps for ``plan``: query blocks grouped by (FULL, PARTIAL) counts.

    ``kv_chunk`` caps the key blocks per inner iteration, ``group_blocks`` the query blocks per
    step; ``tile_elems`` caps the score elements of one tile (times ``value_cost`` per element, the
    head_dim for additive scores). Query blocks with no key block are skipped unless ``memory``
    (memory tokens are seen by every row).
    """
    states = np.asarray(plan.states)
    if plan.seq_k % plan.block_n:
        last = states[..., -1]
        states = states.copy()
        states[..., -1] = np.where(last == FULL, PARTIAL, last)
    steps, visited = [], 0
    for sl in plan_slices(plan, batch, kv_heads, group):
        st = states[sl.bp, sl.hp]
        full, part = st == FULL, st == PARTIAL
        n_full, n_part = full.sum(-1), part.sum(-1)
        order = np.argsort(-(st.astype(np.int64)), axis=-1, kind="stable")
        visited += int((n_full + n_part).sum()) * sl.nb * sl.nh * sl.ng
        keys = sorted(set(zip(n_full.tolist(), n_part.tolist(), strict=True)))
        for nf, npart in keys:
            if nf + npart == 0 and not memory:
                continue
            rows = np.nonzero((n_full == nf) & (n_part == npart))[0]
            table = order[rows, :nf + npart]
            steps += _split(sl, rows, table, nf, plan, kv_chunk, group_blocks,
                            tile_elems // max(value_cost, 1), device)
    total = states.shape[-2] * states.shape[-1] * batch * kv_heads * group
    return Schedule(tuple(steps), visited, total, tile_elems)


def _split(sl: Slice, rows, table, nf: int, plan, kv_chunk: int, group_blocks: int,
           tile_elems: int, device) -> list[Step]:
    c = table.shape[1]
    per_chunk = max(1, min(kv_chunk, c)) if c else 0
    tile_per_block = sl.nb * sl.nh * sl.ng * plan.block_m * max(per_chunk * plan.block_n, 1)
    g_max = max(1, min(group_blocks, tile_elems // max(tile_per_block, 1)))
    steps = []
    for start in range(0, len(rows), g_max):
        part_rows, part_table = rows[start:start + g_max], table[start:start + g_max]
        chunks = []
        for c0 in range(0, c, per_chunk or 1):
            kv = torch.as_tensor(np.ascontiguousarray(part_table[:, c0:c0 + per_chunk]),
                                 dtype=torch.long, device=device)
            chunks.append(Chunk(kv, max(0, min(nf - c0, per_chunk))))
        qb = torch.as_tensor(part_rows, dtype=torch.long, device=device)
        steps.append(Step(sl, qb, tuple(chunks)))
    return steps


#: Where b, h, q_idx, kv_idx sit in the 7-D view ``(nb, nh, G, ng, block_m, c, block_n)``.
LAYOUT = Layout(7, b=(0,), h=(1, 3), q_idx=(2, 4), kv_idx=(2, 5, 6))


class Problem:
    """One call, bound: the fused node, sizes, padded tensors' geometry, inputs and the schedule.

    ``drop`` is ``Not(mask)`` (None without a mask); ``inputs`` holds the integer inputs by name
    (float ones travel as autograd arguments); ``nk`` is the number of keys the mask sees
    (``seq_k``, or the Linformer rank). ``mixed`` (a ``mixed.Mixed``, or None): q, k, v are
    half types whose products ``mm`` returns in ``acc``, float32; without it ``mm`` is ``@``
    and ``acc`` the tensors' dtype (``dtype``).
    """

    def __init__(self, node, drop, sizes: dict, inputs: dict, scale: float, plan, nk: int,
                 schedule, device, dtype, mixed=None):
        self.node, self.drop_expr, self.sizes, self.inputs = node, drop, sizes, inputs
        self.scale, self.schedule, self.device = scale, schedule, device
        self.mixed = mixed
        self.mm = mixed or operator.matmul
        self.acc = mixed.acc if mixed else dtype
        self.bm, self.bn = plan.block_m, plan.block_n
        self.nq, self.nk = sizes["seq_q"], nk
        self.group = sizes["heads"] // sizes["kv_heads"]
        self.padded = self.nk % self.bn != 0
        self.ar_m = torch.arange(self.bm, device=device)
        self.ar_n = torch.arange(self.bn, device=device)
        self._heads: dict = {}

    # -- gathers -------------------------------------------------------------------------
    # Block axes come first and the gathers run on a 2-D (blocks, rest) view: index_select /
    # index_copy_ / index_add_ then copy whole contiguous rows (far faster than on an inner dim).
    def to_blocks(self, x, kv: bool = False):
        """Queries ``(B, Hkv, group, Nq, X)`` (keys or values ``(B, Hkv, Nk, X)`` with ``kv``),
        zero-padded to whole blocks -> the block-major copy ``(nQ, B, Hkv, group, bm, X)``
        (``(nK, B, Hkv, bn, X)``)."""
        size, n = (self.bn, self.nk) if kv else (self.bm, self.nq)
        if n % size:
            x = F.pad(x, (0, 0, 0, -n % size))
        a = x.ndim - 2
        return x.unflatten(a, (-1, size)).permute(a, *range(a), a + 1, a + 2).contiguous()

    def from_blocks(self, x, kv: bool = False):
        """The inverse of ``to_blocks``, padding cut off (a view)."""
        a = x.ndim - 3
        x = x.permute(*range(1, a + 1), 0, a + 1, a + 2).flatten(a, a + 1)
        return x[..., :self.nk if kv else self.nq, :]

    def rows(self, x6, step: Step):
        """Rows of block-major ``x6`` for a step: ``(nb, nh, G, ng*bm, X)``."""
        sl = step.slice
        x = _take(x6, step.qblocks)
        x = x[:, sl.b0:sl.b0 + sl.nb, sl.h0:sl.h0 + sl.nh, sl.g0:sl.g0 + sl.ng]
        return x.permute(1, 2, 0, 3, 4, 5).flatten(3, 4)

    def put_rows(self, x6, step: Step, value) -> None:
        """Write ``value (nb, nh, G, ng*bm, X)`` back where ``rows`` read it."""
        sl = step.slice
        target = x6[:, sl.b0:sl.b0 + sl.nb, sl.h0:sl.h0 + sl.nh, sl.g0:sl.g0 + sl.ng]
        value = value.unflatten(3, (sl.ng, self.bm)).permute(2, 0, 1, 3, 4, 5)
        if target.is_contiguous():
            target = target.view(target.shape[0], -1)
            value = value.reshape(value.shape[0], -1)
        target.index_copy_(0, step.qblocks, value)

    def cols(self, xb, sl: Slice, chunk: Chunk):
        """Key blocks of block-major ``xb (nK, B, Hkv, bn, X)``: ``(nb, nh, G, c*bn, X)``."""
        x = _take(xb, chunk.kv.flatten())[:, sl.b0:sl.b0 + sl.nb, sl.h0:sl.h0 + sl.nh]
        x = x.unflatten(0, chunk.kv.shape)                         # G c nb nh bn X
        return x.permute(2, 3, 0, 1, 4, 5).flatten(3, 4)

    def add_cols(self, xb, sl: Slice, chunk: Chunk, value) -> None:
        """Accumulate ``value (nb, nh, G, c*bn, X)`` into the key blocks ``cols`` read."""
        target = xb[:, sl.b0:sl.b0 + sl.nb, sl.h0:sl.h0 + sl.nh]
        value = value.unflatten(3, (-1, self.bn)).permute(2, 3, 0, 1, 4, 5).flatten(0, 1)
        if target.is_contiguous():
            target = target.view(target.shape[0], -1)
            value = value.reshape(value.shape[0], -1)
        target.index_add_(0, chunk.kv.flatten(), value)

    # -- scores --------------------------------------------------------------------------
    def tiles(self, step: Step, kb, vb, inputs: dict):
        """Lazily ``(chunk, k, v)`` of a step's tiles: the memory tokens first (chunk None,
        ``(1, nh, 1, M, D)``), then each chunk's key blocks gathered ``(nb, nh, G, c*bn, D)``."""
        sl = step.slice
        if self.node.memory_tokens:
            heads = slice(sl.h0, sl.h0 + sl.nh)
            yield None, inputs["mem_k"][None, heads, None], inputs["mem_v"][None, heads, None]
        for chunk in step.chunks:
            yield chunk, self.cols(kb, sl, chunk), self.cols(vb, sl, chunk)

    def raw(self, sl: Slice, q, k, inputs: dict):
        """Scores before score_mod (``attncc.lowering.env.raw_scores``; mixed: the half
        product times the scale, in float32); additive scores are computed (in ``acc``) on the
        rows viewed ``(nb, nh, G, ng, bm, D)``, w per query head."""
        if self.node.score != "additive":
            return raw_scores(q, k, self.scale, matmul=self.mixed)
        q, k = q.to(self.acc), k.to(self.acc)
        w = inputs["w"].unflatten(0, (-1, self.group))[sl.h0:sl.h0 + sl.nh, sl.g0:sl.g0 + sl.ng]
        s = raw_scores(q.unflatten(3, (sl.ng, self.bm)), k[:, :, :, None], self.scale,
                       w[None, :, None, :, None, None, :])
        return s.flatten(3, 4)

    def scores(self, step: Step, chunk: Chunk, q, k, inputs: dict, slope: bool = False):
        """The tile's final scores: raw, score_mod, then -inf where the mask (or padding) drops.

        The mask is evaluated on the PARTIAL columns only; FULL columns keep every pair. The
        memory tile (``chunk`` None) has raw scores only. With ``slope``, ``(s, d)``: ``d`` is
        ``d score_mod / d score`` (``score_slope``) on the tile's raw scores, broadcastable to
        ``s``, or None where it is 1 (no score_mod, the memory tile).
        """
        sl = step.slice
        s = self.raw(sl, q, k, inputs)
        score_mod, d = self.node.score_mod, None
        if chunk is None or (score_mod is None and chunk.n_full == chunk.kv.shape[1]):
            return (s, d) if slope else s
        s7 = s.unflatten(4, (-1, self.bn)).unflatten(3, (sl.ng, self.bm))
        if score_mod is not None:
            env = self.env(step, chunk.kv, inputs)
            env, expr = {**env, "score": s7}, score_mod
            if slope:  # score_mod and its derivative share subexpressions (tanh(score / cap))
                common, expr, d_expr = score_slope(score_mod)
                for symbol, e in common:
                    env[symbol.name] = evaluate(e, env, xp)
                d = _tile(evaluate(d_expr, env, xp), s7)
            value = torch.as_tensor(evaluate(expr, env, xp), dtype=s7.dtype, device=s7.device)
            s7 = torch.broadcast_to(value, s7.shape)
        nf = chunk.n_full
        drop = self.drop(step, chunk.kv[:, nf:], inputs) if nf < chunk.kv.shape[1] else None
        if drop is not None and s7.requires_grad:
            tail = torch.where(drop, float("-inf"), s7[..., nf:, :])
            s7 = torch.cat([s7[..., :nf, :], tail], dim=-2) if nf else tail
        elif drop is not None:  # no autograd graph to protect: mask in place, no copy of the tile
            s7[..., nf:, :].masked_fill_(drop, float("-inf"))
        s = s7.flatten(5, 6).flatten(3, 4)
        return (s, d) if slope else s

    def drop(self, step: Step, blocks, inputs: dict):
        """Pairs of the key ``blocks (G, c)`` that the mask (or padding) removes, 7-D
        broadcastable; None when none is removed. Evaluates ``Not(mask)`` directly (sympy pushes
        the negation into the comparisons), so no extra pass inverts the result."""
        drop = None
        if self.padded:
            pos = blocks[:, :, None] * self.bn + self.ar_n
            drop = (pos >= self.nk).reshape(1, 1, blocks.shape[0], 1, 1, *pos.shape[1:])
        if self.drop_expr is not None:
            value = evaluate(self.drop_expr, self.env(step, blocks, inputs), xp)
            if isinstance(value, bool):
                value = torch.full((1,) * 7, value, device=self.device)
            drop = value if drop is None else drop | value
        return drop

    def env(self, step: Step, blocks, inputs: dict) -> dict:
        """Sizes, inputs and ``b, h, q_idx, kv_idx`` for a tile (positions clamped in-bounds)."""
        sl = step.slice
        if sl not in self._heads:  # b and h are the slice's: placed once per call
            self._heads[sl] = LAYOUT.fixed({}, {}, *sl.indices(torch, self.group, self.device))
        q_pos = (step.qblocks[:, None] * self.bm + self.ar_m).clamp(max=self.nq - 1)
        kv_pos = (blocks[:, :, None] * self.bn + self.ar_n).clamp(max=self.nk - 1)
        return LAYOUT.env({**self.sizes, **inputs, **self._heads[sl]}, q_pos, kv_pos)


@functools.lru_cache(maxsize=256)
def score_slope(score_mod):
    """``(common, score_mod', d)``: ``d = d score_mod / d score`` and both expressions over the
    subexpressions they share (``common``: ``(symbol, expr)`` to evaluate first, in order;
    ``sympy.cse``); None where the derivative is not elementwise-evaluable (sympy left a
    derivative unevaluated: floor, sign, ...; such tiles differentiate by autograd)."""
    d = sympy.diff(score_mod, score).xreplace({sympy.Float(1.0): sympy.Integer(1)})
    if d.has(sympy.Derivative, sympy.Subs):
        return None
    common, (mod, d) = sympy.cse([score_mod, d], symbols=sympy.numbered_symbols("_cse"))
    return tuple(common), mod, d


def _tile(value, s7):
    """An evaluated tile-shaped expression as a 5-D tile ``(nb, nh, G, R, C)`` (or a scalar)."""
    if isinstance(value, int | float):
        return None if value == 1 else value
    value = torch.broadcast_to(torch.as_tensor(value, dtype=s7.dtype, device=s7.device),
                               s7.shape)
    return value.flatten(5, 6).flatten(3, 4)


def _take(x, index):
    """``x[index]`` along dim 0 of a contiguous tensor, as whole-row copies of a 2-D view."""
    return x.view(x.shape[0], -1).index_select(0, index).view(index.shape[0], *x.shape[1:])
