"""Block-sparse softmax on CPU as fused SDPA calls over contiguous runs of key blocks.

Most block plans keep, per query block, a few *runs* of consecutive key blocks: a band for a
sliding window, the document's own blocks for a document mask, a band plus some global columns
for Longformer and BigBird. For each run the keys and values are plain slices of the
``(B, H, N, D)`` tensors (zero-copy views); where a query block has several runs their slices are
concatenated once. Consecutive query blocks with the same runs form one *group*, which is one call
of torch's CPU flash-attention kernel (``_scaled_dot_product_flash_attention_for_cpu``): the score
mod, the exp and the sums are fused there, and it returns the log-sum-exp. The mask enters as an
additive 0/-inf tile only for groups that touch a PARTIAL block; it is evaluated once per plan
(cached) for masks that read only indices, per call for masks that read inputs.

Driven by the plan alone: no mask is recognised by name. Used for forward passes without
gradients (the autograd path keeps the recomputing flash backward); ``space.fused_eligible``
says for which specs.
"""

from __future__ import annotations

from dataclasses import dataclass

import array_api_compat.torch as xp
import numpy as np
import torch

from attncc.spec.numeric import evaluate

from .schedule import slices

EMPTY, PARTIAL = 0, 1
NEG_INF = float("-inf")


@dataclass(frozen=True)
class Group:
    """Query rows ``r0:r1`` of query heads ``hq0:hq0+nhq`` and batch ``b0:b0+nb`` against the key
    position ranges ``cols``; ``masked`` when a PARTIAL block is among them."""

    b0: int
    nb: int
    hq0: int
    nhq: int
    r0: int
    r1: int
    cols: tuple[tuple[int, int], ...]
    masked: bool


def build_groups(plan, batch: int, kv_heads: int, group: int) -> list[Group]:
    """The groups of ``plan``: per slice, consecutive query blocks with equal key-block runs.

    Query blocks with no key block get no group (their rows stay 0 with lse -inf).
    """
    bm, bn, nq, nk = plan.block_m, plan.block_n, plan.seq_q, plan.seq_k
    states = np.asarray(plan.states)
    groups = []
    for sl, bp, hp in slices(plan, batch, kv_heads, group):
        st = states[bp, hp]
        hq0, nhq = sl.h0 * group + sl.g0, sl.nh * sl.ng
        prev = None
        for m in range(st.shape[0]):
            kept = np.nonzero(st[m] != EMPTY)[0]
            if kept.size == 0:
                prev = None
                continue
            cuts = np.nonzero(np.diff(kept) > 1)[0]
            starts = kept[np.concatenate([[0], cuts + 1])]
            ends = kept[np.concatenate([cuts, [kept.size - 1]])] + 1
            cols = tuple((int(s) * bn, min(int(e) * bn, nk)) for s, e in zip(starts, ends,
                                                                            strict=True))
            masked = bool((st[m, kept] == PARTIAL).any())
            r0, r1 = m * bm, min((m + 1) * bm, nq)
            if prev is not None and prev.cols == cols:
                prev = Group(sl.b0, sl.nb, hq0, nhq, prev.r0, r1, cols, prev.masked or masked)
                groups[-1] = prev
            else:
                prev = Group(sl.b0, sl.nb, hq0, nhq, r0, r1, cols, masked)
                groups.append(prev)
    return groups


def group_mask(spec, g: Group, sizes: dict, inputs: dict, dtype, group: int, device):
    """``(additive mask (nb|1, nhq|1, R, C), dead rows (nb|1, nhq|1, R))`` of a masked group:
    0 where the mask keeps a pair, -inf where it drops it; a dead row keeps no pair."""
    ar = lambda a, b: torch.arange(a, b, device=device)  # noqa: E731
    kv = torch.cat([ar(c0, c1) for c0, c1 in g.cols])
    env = {**sizes, **inputs, "b": ar(g.b0, g.b0 + g.nb).view(-1, 1, 1, 1),
           "h": ar(g.hq0, g.hq0 + g.nhq).view(1, -1, 1, 1),
           "q_idx": ar(g.r0, g.r1).view(1, 1, -1, 1), "kv_idx": kv.view(1, 1, 1, -1)}
    keep = evaluate(spec.mask, env, xp)
    if isinstance(keep, bool):
        keep = torch.full((1, 1, 1, 1), keep, device=device)
    keep = torch.broadcast_to(keep, (*keep.shape[:2], g.r1 - g.r0, kv.numel()))
    mask = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, NEG_INF)
    return mask, ~keep.any(-1)


class RunsForward:
    """Forward of one spec over a plan's groups; masks of index-only specs are cached here."""

    def __init__(self, spec, plan, sizes: dict, *, cache_masks: bool):
        self.spec, self.plan, self.sizes = spec, plan, sizes
        self.group = sizes["heads"] // sizes["kv_heads"]
        self.groups = build_groups(plan, sizes["batch"], sizes["kv_heads"], self.group)
        self.cache_masks = cache_masks
        self._masks: dict = {}

    def _mask(self, i: int, g: Group, inputs: dict, dtype, device):
        key = (i, dtype, str(device))
        if key in self._masks:
            return self._masks[key]
        value = group_mask(self.spec, g, self.sizes, inputs, dtype, self.group, device)
        if self.cache_masks:
            self._masks[key] = value
        return value

    def __call__(self, q, k, v, scale: float, inputs: dict):
        """``(out (B, H, Nq, D), lse (B, H, Nq))`` for ``q (B, H, Nq, D)``, ``k``/``v``
        ``(B, H, Nk, D)`` (no GQA) on CPU, all one floating dtype."""
        batch, heads, nq, _ = q.shape
        out = torch.zeros((batch, heads, nq, v.shape[-1]), dtype=q.dtype, device=q.device)
        lse = torch.full((batch, heads, nq), NEG_INF, dtype=q.dtype, device=q.device)
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        for i, g in enumerate(self.groups):
            bs, hs, rs = slice(g.b0, g.b0 + g.nb), slice(g.hq0, g.hq0 + g.nhq), slice(g.r0, g.r1)
            qg = q[bs, hs, rs]
            if len(g.cols) == 1:
                (c0, c1), = g.cols
                kg, vg = k[bs, hs, c0:c1], v[bs, hs, c0:c1]
            else:
                kg = torch.cat([k[bs, hs, c0:c1] for c0, c1 in g.cols], dim=2)
                vg = torch.cat([v[bs, hs, c0:c1] for c0, c1 in g.cols], dim=2)
            mask = dead = None
            if g.masked:
                mask, dead = self._mask(i, g, inputs, q.dtype, q.device)
            o, lg = flash(qg, kg, vg, attn_mask=mask, scale=scale)
            if dead is not None:
                lg = lg.masked_fill(dead, NEG_INF)
            out[bs, hs, rs] = o
            lse[bs, hs, rs] = lg
        return out, lse
