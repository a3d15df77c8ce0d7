"""One tile of scores in torch: gathers, raw score, score_mod and mask on broadcast index tensors.

A step's tiles are five-dimensional, ``(nb, nh, G, R, C)``: batch entries, kv heads, query blocks,
rows (the ``ng`` query heads of a kv head times ``block_m`` positions) and columns (``c`` key blocks
times ``block_n`` positions). Queries of the heads sharing a kv head are stacked on the row axis, so
one gathered key tile serves all of them: K/V are never copied per query head. For expressions the
tile is viewed as ``(nb, nh, G, ng, block_m, c, block_n)`` and the index symbols are integer tensors
that broadcast against it, so ``slope[h]`` or ``doc[b, q_idx]`` index inputs as the reference does.
"""

from __future__ import annotations

import array_api_compat.torch as xp
import torch

from attncc.spec.numeric import evaluate

from .schedule import Chunk, Slice, Step


class Problem:
    """One call, bound: spec, sizes, padded tensors' geometry, inputs and the compute dtype.

    ``inputs`` holds every input by name (float ones already in the compute dtype); ``nk`` is the
    number of keys the mask sees (``seq_k``, or the Linformer rank).
    """

    def __init__(self, spec, sizes: dict, inputs: dict, scale: float, plan, nk: int,
                 schedule, device):
        self.spec = spec
        self.sizes = sizes
        self.inputs = inputs
        self.scale = scale
        self.bm, self.bn = plan.block_m, plan.block_n
        self.nq, self.nk = sizes["seq_q"], nk
        self.group = sizes["heads"] // sizes["kv_heads"]
        self.schedule = schedule
        self.device = device
        self.memory = spec.memory_tokens
        self.ar_m = torch.arange(self.bm, device=device)
        self.ar_n = torch.arange(self.bn, device=device)

    # -- gathers -------------------------------------------------------------------------
    def rows(self, x5, step: Step):
        """Rows of ``x5 (B, Hkv, group, nQ*bm, X)`` for a step: ``(nb, nh, G, ng*bm, X)``."""
        sl = step.slice
        x = x5[sl.b0:sl.b0 + sl.nb, sl.h0:sl.h0 + sl.nh, sl.g0:sl.g0 + sl.ng]
        x = x.unflatten(3, (-1, self.bm))[:, :, :, step.qblocks]
        return x.transpose(2, 3).flatten(3, 4)

    def put_rows(self, x5, step: Step, value) -> None:
        """Write ``value (nb, nh, G, ng*bm, ...)`` back where ``rows`` read it."""
        sl = step.slice
        target = x5[sl.b0:sl.b0 + sl.nb, sl.h0:sl.h0 + sl.nh, sl.g0:sl.g0 + sl.ng]
        target = target.unflatten(3, (-1, self.bm))
        value = value.unflatten(3, (sl.ng, self.bm)).transpose(2, 3)
        target[:, :, :, step.qblocks] = value

    def cols(self, x4, sl: Slice, chunk: Chunk):
        """Key blocks of ``x4 (B, Hkv, nK*bn, X)`` for a chunk: ``(nb, nh, G, c*bn, X)``."""
        x = x4[sl.b0:sl.b0 + sl.nb, sl.h0:sl.h0 + sl.nh].unflatten(2, (-1, self.bn))
        return x[:, :, chunk.kv].flatten(3, 4)

    def add_cols(self, x4, sl: Slice, chunk: Chunk, value) -> None:
        """Accumulate ``value (nb, nh, G, c*bn, X)`` into the key blocks ``cols`` read."""
        target = x4[sl.b0:sl.b0 + sl.nb, sl.h0:sl.h0 + sl.nh].unflatten(2, (-1, self.bn))
        value = value.unflatten(3, (-1, self.bn)).flatten(2, 3)
        target.index_add_(2, chunk.kv.flatten(), value)

    # -- scores --------------------------------------------------------------------------
    def raw(self, sl: Slice, q, k, inputs: dict):
        """Scores before score_mod: ``scale·q·kᵀ`` or additive ``Σ_d w[h,d]·tanh(q_d + k_d)``."""
        if self.spec.score != "additive":
            return (q * self.scale) @ k.transpose(-1, -2)
        w = inputs["w"].unflatten(0, (-1, self.group))[sl.h0:sl.h0 + sl.nh, sl.g0:sl.g0 + sl.ng]
        qv = q.unflatten(3, (sl.ng, self.bm))[..., :, None, :]        # nb nh G ng bm 1 D
        kv = k[:, :, :, None, None, :, :]                              # nb nh G 1 1 C D
        hidden = torch.tanh(qv + kv) * w[None, :, None, :, None, None, :]
        return hidden.sum(-1).flatten(3, 4)

    def memory_scores(self, sl: Slice, q, inputs: dict):
        """Raw scores of the rows against the memory tokens ``(nb, nh, G, R, M)``."""
        mem_k = inputs["mem_k"][None, sl.h0:sl.h0 + sl.nh, None]
        return self.raw(sl, q, mem_k, inputs)

    def scores(self, step: Step, chunk: Chunk, q, k, inputs: dict):
        """The tile's final scores: raw, score_mod, then -inf where the mask (or padding) drops.

        The mask is evaluated on the PARTIAL columns only; FULL columns keep every pair.
        """
        sl = step.slice
        s = self.raw(sl, q, k, inputs)
        spec = self.spec
        if spec.score_mod is None and chunk.n_full == chunk.kv.shape[1]:
            return s
        s7 = s.unflatten(4, (-1, self.bn)).unflatten(3, (sl.ng, self.bm))
        env = self.env(step, chunk.kv, inputs)
        if spec.score_mod is not None:
            s7 = _like(evaluate(spec.score_mod, {**env, "score": s7}, xp), s7)
        nf = chunk.n_full
        if nf < chunk.kv.shape[1]:
            part = chunk.kv[:, nf:]
            keep = self.keep(step, part, inputs)
            tail = torch.where(keep, s7[..., nf:, :], float("-inf"))
            s7 = torch.cat([s7[..., :nf, :], tail], dim=-2) if nf else tail
        return s7.flatten(5, 6).flatten(3, 4)

    def keep(self, step: Step, blocks, inputs: dict):
        """Mask of the key ``blocks (G, c)``: the spec's mask and the padding, 7-D broadcastable."""
        pos = blocks[:, :, None] * self.bn + self.ar_n
        keep = (pos < self.nk).reshape(1, 1, *blocks.shape[:1], 1, 1, *pos.shape[1:])
        if self.spec.mask is not None:
            env = self.env(step, blocks, inputs)
            value = evaluate(self.spec.mask, env, xp)
            if not isinstance(value, bool):
                keep = keep & value
            elif not value:
                keep = torch.zeros_like(keep)
        return keep

    def env(self, step: Step, blocks, inputs: dict) -> dict:
        """Sizes, inputs and ``b, h, q_idx, kv_idx`` for a tile (positions clamped in-bounds)."""
        sl = step.slice
        dev = self.device
        b = torch.arange(sl.b0, sl.b0 + sl.nb, device=dev).view(-1, 1, 1, 1, 1, 1, 1)
        heads = (torch.arange(sl.h0, sl.h0 + sl.nh, device=dev)[:, None] * self.group
                 + torch.arange(sl.g0, sl.g0 + sl.ng, device=dev))
        q_pos = (step.qblocks[:, None] * self.bm + self.ar_m).clamp(max=self.nq - 1)
        kv_pos = (blocks[:, :, None] * self.bn + self.ar_n).clamp(max=self.nk - 1)
        return {**self.sizes, **inputs, "b": b, "h": heads.view(1, sl.nh, 1, sl.ng, 1, 1, 1),
                "q_idx": q_pos.view(1, 1, -1, 1, self.bm, 1, 1),
                "kv_idx": kv_pos.view(1, 1, -1, 1, 1, *kv_pos.shape[1:])}


def _like(value, like):
    if isinstance(value, (int, float)):
        return torch.full_like(like, float(value))
    return torch.broadcast_to(value.to(like.dtype), like.shape)
