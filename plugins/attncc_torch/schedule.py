"""From a BlockPlan to the steps the torch kernel runs: batched gathers over equal-sized rows.

A *slice* (``attncc.lowering.env.Slice``) is the set of (batch, head) pairs that share one slice of
the plan. Inside a slice, query blocks with the same number of FULL and PARTIAL key blocks
form a *step*: their key blocks are gathered into one ``(G, c)`` index table and processed by one
batched matmul per kv chunk. EMPTY blocks appear in no table, so they cost nothing; in every row of
a table the FULL blocks come first, so the elementwise mask runs only on the columns after them.

When ``seq_k`` is not a multiple of ``block_n`` the last key block holds padding, so it is demoted
from FULL to PARTIAL (the padding is removed with the mask, on PARTIAL blocks only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attncc.lowering.env import Slice, plan_slices
from attncc.plan import FULL, PARTIAL


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
    """Every step of one call; ``visited`` / ``total`` count key blocks (for the source text)."""

    steps: tuple[Step, ...]
    visited: int
    total: int


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
    return Schedule(tuple(steps), visited, total)


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
