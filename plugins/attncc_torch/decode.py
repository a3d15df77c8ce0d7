"""The decode path: a few query rows (a decoding step against a KV cache) in one pass.

For ``seq_q <= MAX_ROWS`` the tile loop's per-step gathers and online softmax cost more than the
arithmetic; here the scores of every (batch, query head, row, key) are one batched matmul per kv
head, ``(B, Hkv, group * seq_q, D) @ (B, Hkv, D, seq_k)`` (grouped-query heads read their kv
head, no copy), the score_mod and the mask are evaluated once over the ``(B, Hkv, group, seq_q,
seq_k)`` tile (the same ``attncc.spec.numeric.evaluate`` and index layout as the tile loop), then
one softmax and one matmul with V. Memory: ``O(heads * seq_q * seq_k)``, linear in the keys for
bounded ``seq_q``. Any score_mod and mask the spec language writes; autograd is torch's own
through these plain ops (gradients of score_mod inputs included).

Rows whose every key the mask removes give zeros and a log-sum-exp of -inf, as on the other
paths. A mask that reads no input depends only on the sizes: it is evaluated once per call's
sizes and cached (a few at a time) with the rows it leaves empty (None where it keeps every
pair, as a bottom-right causal mask does for a single query row).
"""

from __future__ import annotations

import array_api_compat.torch as xp
import sympy
import torch

from attncc.lowering.env import Layout, merge_heads, raw_scores, split_heads
from attncc.spec.numeric import evaluate
from attncc.spec.symbols import score

#: The most query rows the decode path takes (a decoding step; speculative or chunked ones).
MAX_ROWS = 16

#: Where b, h, q_idx, kv_idx sit in the tile ``(B, Hkv, group, seq_q, seq_k)``.
LAYOUT = Layout(5, b=(0,), h=(1, 2), q_idx=(3,), kv_idx=(4,))


class DecodeRunner:
    """``runner(call, k, v, return_lse) -> (out (B, H, seq_q, Dv), lse (B, H, seq_q) or None)``
    for a fused softmax node with a dot score (``node.lowering.allows("decode")``); ``drop`` is
    ``Not(mask)`` or None."""

    def __init__(self, node, drop):
        self.node, self.drop_expr = node, drop
        self._static = drop is not None and not drop.atoms(sympy.Indexed)
        self._masks: dict = {}
        # whether score_mod reads more than the score (indices, sizes, inputs)
        mod = node.score_mod
        self._reads = mod is not None and bool(mod.free_symbols - {score}
                                               or mod.atoms(sympy.Indexed))

    def __call__(self, call, k, v, return_lse: bool):
        q5 = split_heads(call.q, k.shape[1])                       # (B, Hkv, G, nq, D)
        g, nq = q5.shape[2:4]
        s = raw_scores(q5.flatten(2, 3), k, call.scale).unflatten(2, (g, nq))
        env = None
        if self.node.score_mod is not None:
            env = self._env(call, q5) if self._reads else {}
            value = evaluate(self.node.score_mod, {**env, "score": s}, xp)
            s = torch.broadcast_to(torch.as_tensor(value, dtype=s.dtype, device=s.device),
                                   s.shape)
        drop, dead = self._mask(call, q5, env)
        if drop is not None:
            if s.requires_grad or not s.is_contiguous():  # a graph, or a broadcast value
                s = s.masked_fill(drop, float("-inf"))
            else:
                s.masked_fill_(drop, float("-inf"))
            if dead is not None:  # rows with no key: a finite softmax, then zeros
                s = s.masked_fill(dead, 0.0)
        p = torch.softmax(s, dim=-1)
        out = (p.flatten(2, 3) @ v).unflatten(2, (g, nq))
        lse = torch.logsumexp(s, dim=-1) if return_lse else None
        if dead is not None:
            out = out.masked_fill(dead, 0.0)
            lse = lse.masked_fill(dead[..., 0], float("-inf")) if return_lse else None
        return merge_heads(out), (merge_heads(lse[..., None])[..., 0] if return_lse else None)

    def _env(self, call, q5):
        nb, hk, g, nq, _ = q5.shape
        dev = q5.device
        heads = torch.arange(hk * g, device=dev).view(hk, g)
        fixed = LAYOUT.fixed(call.sizes, call.inputs, torch.arange(nb, device=dev), heads)
        return LAYOUT.env(fixed, torch.arange(nq, device=dev),
                          torch.arange(call.sizes["seq_k"], device=dev))

    def _mask(self, call, q5, env):
        """``(drop, dead)``: pairs the mask removes and rows it leaves empty (broadcastable
        bool tensors, None where there are none)."""
        if self.drop_expr is None:
            return None, None
        key = (*sorted(call.sizes.items()), str(q5.device))
        if self._static and key in self._masks:
            return self._masks[key]
        drop = evaluate(self.drop_expr, env or self._env(call, q5), xp)
        drop = torch.as_tensor(drop, device=q5.device)
        dead = drop.all(dim=-1, keepdim=True)
        result = (drop if drop.any() else None, dead if dead.any() else None)
        if self._static:
            if len(self._masks) >= 64:  # decoding grows seq_k by one per step
                self._masks.clear()
            self._masks[key] = result
        return result
