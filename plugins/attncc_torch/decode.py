"""The decode path: a few query rows (a decoding step against a KV cache) in one pass.

For ``seq_q <= MAX_ROWS`` the tile loop's per-step gathers and online softmax cost more than the
arithmetic. Here the mask is evaluated once over the call's ``(B, Hkv, group, seq_q, seq_k)``
index tile (``LAYOUT``: the tile loop's index layout, ``attncc.spec.numeric.evaluate``), then:

- no score_mod, or an additive one (``score + bias``, ``strategy.additive_bias``): one
  ``scaled_dot_product_attention`` call (grouped-query heads through ``enable_gqa``, no copy),
  the mask as a bool tile or, with a bias, the bias with ``-inf`` where the mask drops a pair;
- any other score_mod (soft-capping): the scores of every (batch, query head, row, key) in one
  batched matmul per kv head, ``(B, Hkv, group * seq_q, D) @ (B, Hkv, D, seq_k)``, the score_mod
  over the tile, one softmax and one matmul with V.

Memory: ``O(heads * seq_q * seq_k)``, linear in the keys for bounded ``seq_q``. Autograd is
torch's own through these ops (gradients of score_mod inputs included); the log-sum-exp, where
asked for, comes from the dense scores (SDPA returns none).

The mask is split into its conjuncts: those that read no input depend only on the sizes and are
evaluated once per call's sizes and cached (a few at a time; None where they keep every pair);
for one query row a bottom-right causal term (``strategy.causal_alignment``) is left out, as
that row sits at the last key and sees them all. Those that read inputs (padding, document ids)
are read per call: one bool input at plain indices in tile order (padding ``keep[b, kv_idx]``)
as a reshaped view of it, anything else evaluated with its indices promised in range
(``evaluate(ranges=)``: the tile's aranges). Rows whose every key the mask removes give zeros
and a log-sum-exp of -inf, as on the other paths.
"""

from __future__ import annotations

import math

import array_api_compat.torch as xp
import sympy
import torch
import torch.nn.functional as F  # noqa: N812 - the name torch code uses

from attncc.lowering.env import Layout, merge_heads, raw_scores, split_heads
from attncc.passes.strategy import additive_bias, causal_alignment, decode_fused
from attncc.spec.numeric import evaluate
from attncc.spec.symbols import INDEX_SYMBOLS, score

from .mixed import HALF, Mixed
from .segments import as_tile

#: The most query rows the decode path takes (a decoding step; speculative or chunked ones).
MAX_ROWS = 16

#: Where b, h, q_idx, kv_idx sit in the tile ``(B, Hkv, group, seq_q, seq_k)``.
LAYOUT = Layout(5, b=(0,), h=(1, 2), q_idx=(3,), kv_idx=(4,))

#: The largest row maximum a half type's bias is shifted by (``_sdpa``): past it, a row is
#: padding at the dtype's minimum on every key, whose float64 scores round to one value.
SHIFTED = float(1 << 20)

#: Cached size-only mask parts per runner (decoding grows seq_k by one per step).
MAX_CACHED = 64


class DecodeRunner:
    """``runner(call, k, v, return_lse) -> (out (B, H, seq_q, Dv), lse (B, H, seq_q) or None)``
    for a fused softmax ``node`` with a dot score (``node.lowering.allows("decode")``)."""

    def __init__(self, node):
        self.node = node
        mod = node.score_mod
        # an additive score_mod's bias as written, at score 0: ALiBi's -slope[h] * (distance)
        # multiplies once over the tile where additive_bias's expanded form has four products
        self.bias = mod.subs(score, 0) if additive_bias(mod) is not None else None
        self.fused = decode_fused(node)
        terms = sympy.And.make_args(node.mask.expr) if node.mask is not None else ()
        static = [t for t in terms if not t.atoms(sympy.Indexed)]
        read = [t for t in terms if t.atoms(sympy.Indexed)]
        # for one query row (it sits at the last key) a bottom-right causal term keeps every key
        one_row = [t for t in static if causal_alignment(t) != "bottom_right"]
        self._static = {False: sympy.And(*static) if static else None,
                        True: sympy.And(*one_row) if one_row else None}
        self._read = sympy.And(*read) if read else None
        self._view = _plain_read(self._read)
        self._ar: dict = {}  # device -> arange(n) for the largest n seen (views serve smaller)
        self._rows: dict = {}  # (B, Hkv, G, nq, device) -> the placed b, h, q_idx
        self._masks: dict = {}
        # whether the score_mod (or its bias) reads more than the score: indices, sizes, inputs
        expr = self.bias if self.fused else mod
        self._reads = expr is not None and bool(expr.free_symbols - {score}
                                                or expr.atoms(sympy.Indexed))

    def __call__(self, call, k, v, return_lse: bool):
        q5 = split_heads(call.q, k.shape[1])                       # (B, Hkv, G, nq, D)
        env = (self._env(call, q5) if self._reads or (self._read is not None
                                                      and self._view is None) else None)
        keep, dead = self._keep(call, q5, env)
        if self.fused and not return_lse:
            # rows with no key see every key in the call (finite on every SDPA kernel; their
            # output is zeroed below, so they pass no gradient)
            seen = keep if keep is None or dead is None else keep | dead
            out, lse = self._sdpa(call, k, v, env, seen), None
        else:
            out, lse = self._dense(call, q5, k, v, env, keep, return_lse)
        if dead is not None:  # rows with no key: zeros (and lse -inf)
            dead = _heads(dead, *q5.shape[1:3])
            out = out.masked_fill(dead, 0.0)
            lse = lse.masked_fill(dead[..., 0], float("-inf")) if return_lse else None
        return out, lse

    def _sdpa(self, call, k, v, env, keep):
        """One fused call: the mask as ``keep`` (bool) or the bias, -inf where dropped. SDPA
        takes a float mask in q's dtype only: for a half type the bias is first shifted by its
        row maximum over every key (the softmax is unchanged), so that the keys that carry the
        weight sit at or below 0, where the half type is finest (ALiBi's ``slope * kv_idx``
        reaches 1e3 and more); not where that maximum passes ``SHIFTED``."""
        hk, g = k.shape[1], call.group
        mask = None if keep is None else _heads(keep, hk, g)
        if self.bias is not None:
            bias = self._value(self.bias, env, call, hk, g)
            if call.q.dtype != bias.dtype:
                top = bias.detach().amax(dim=-1, keepdim=True)
                # a row whose every key sits at a padding minimum keeps it (uniform weights, as
                # the float64 reference rounds them)
                top = torch.where(top.abs() <= SHIFTED, top, 0.0)
                bias = (bias - top).to(call.q.dtype)
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        return F.scaled_dot_product_attention(call.q, k, v, attn_mask=mask, scale=call.scale,
                                              enable_gqa=call.group > 1)

    def _dense(self, call, q5, k, v, env, keep, return_lse: bool):
        """Scores, score_mod, mask, softmax and ``@ v`` over the whole tile; half types as
        half products with float32 results (``mixed.Mixed``), the rest in float32."""
        g, nq = q5.shape[2:4]
        mm = Mixed(call.q.dtype, call.q.device) if call.q.dtype in HALF else None
        s = raw_scores(q5.flatten(2, 3), k, call.scale, matmul=mm).unflatten(2, (g, nq))
        if self.node.score_mod is not None:
            value = evaluate(self.node.score_mod, {**(env or {}), "score": s}, xp)
            s = torch.broadcast_to(torch.as_tensor(value, dtype=s.dtype, device=s.device),
                                   s.shape)
        if keep is not None:
            if s.requires_grad or not s.is_contiguous():  # a graph, or a broadcast value
                s = s.masked_fill(~keep, float("-inf"))
            else:
                s.masked_fill_(~keep, float("-inf"))
            # rows with no key: a finite softmax, zeroed by the caller
            s = s.masked_fill(~keep.any(dim=-1, keepdim=True), 0.0)
        p = torch.softmax(s, dim=-1).flatten(2, 3)
        out = (p @ v if mm is None else mm(p, v)).unflatten(2, (g, nq))
        lse = merge_heads(torch.logsumexp(s, dim=-1)[..., None])[..., 0] if return_lse else None
        return merge_heads(out), lse

    def _value(self, expr, env, call, kv_heads: int, group: int):
        """``expr`` over the tile in the accumulation dtype (float32 for half types),
        ``(B|1, H|1, nq, nk)``."""
        q = call.q
        value = evaluate(expr, env or {}, xp, _ranges(q, call.sizes))
        dtype = torch.float32 if q.dtype in HALF else q.dtype
        return _heads(as_tile(value, 5, q.device, dtype), kv_heads, group)

    def _env(self, call, q5):
        """The tile's index environment (``LAYOUT``): ``b``, ``h`` and ``q_idx`` cached per
        shape, ``kv_idx`` a view of a cached arange (decoding grows the keys by one)."""
        nb, hk, g, nq, _ = q5.shape
        nk = call.sizes["seq_k"]
        key = (nb, hk, g, nq, q5.device)
        rows = self._rows.get(key)
        if rows is None:
            ar = self._arange(max(nb, hk * g, nq), q5.device)
            if len(self._rows) >= MAX_CACHED:
                self._rows.clear()
            with torch.inference_mode(False):
                rows = self._rows[key] = {"b": LAYOUT.place("b", ar[:nb]),
                                          "h": LAYOUT.place("h", ar[:hk * g].view(hk, g)),
                                          "q_idx": LAYOUT.place("q_idx", ar[:nq])}
        kv = LAYOUT.place("kv_idx", self._arange(nk, q5.device)[:nk])
        return {**call.sizes, **call.inputs, **rows, "kv_idx": kv}

    def _arange(self, n: int, device):
        """``arange(m)`` for some ``m >= n`` on ``device``, grown by doubling (decoding grows
        the keys by one per step)."""
        ar = self._ar.get(device)
        if ar is None or ar.shape[0] < n:
            # a normal tensor even under inference_mode: later calls may save its views for
            # backward (a learnable bias reading the indices)
            with torch.inference_mode(False):
                ar = self._ar[device] = torch.arange(max(2 * n, 1024), device=device)
        return ar

    def _keep(self, call, q5, env):
        """``(keep, dead)``: the pairs the mask keeps and the rows it leaves empty, as bool
        tiles broadcastable to ``(B, Hkv, group, seq_q, seq_k)``; None where the mask keeps
        every pair / leaves no row empty."""
        static = self._static_keep(call, q5)
        if self._read is None:
            return static
        keep = self._viewed(call, q5)
        if keep is None:
            env = env if env is not None else self._env(call, q5)
            keep = as_tile(evaluate(self._read, env, xp, _ranges(q5, call.sizes)), 5, q5.device)
        if static[0] is not None:
            keep = keep & static[0]
        if bool(keep.all()):
            return None, None
        alive = keep.any(dim=-1, keepdim=True)
        return keep, (None if bool(alive.all()) else ~alive)

    def _viewed(self, call, q5):
        """The mask's input term as a reshaped view of its bool input, where it is
        ``name[i, j, ...]`` of plain index symbols in tile order (``_plain_read``), each
        spanning its input axis (padding ``keep[b, kv_idx]``): the gather ``evaluate`` would
        do over the index aranges, without them; None otherwise."""
        if self._view is None:
            return None
        name, symbols = self._view
        table = call.inputs[name]
        if table.dtype != torch.bool:
            return None
        tile = (*q5.shape[:4], call.sizes["seq_k"])
        shape = [1] * LAYOUT.ndim
        for symbol, n in zip(symbols, table.shape, strict=True):
            axes = getattr(LAYOUT, symbol)
            if n != math.prod(tile[a] for a in axes):
                return None
            for a in axes:
                shape[a] = tile[a]
        return table.reshape(shape)

    def _static_keep(self, call, q5):
        """``(keep, dead)`` of the conjuncts that read no input, cached per call sizes."""
        static = self._static[q5.shape[3] == 1]
        if static is None:
            return None, None
        key = (*sorted(call.sizes.items()), str(q5.device))
        if key not in self._masks:
            with torch.inference_mode(False):  # cached: usable by later calls with autograd
                keep = as_tile(evaluate(static, self._env(call, q5), xp), 5, q5.device)
            dead = ~keep.any(dim=-1, keepdim=True)
            if len(self._masks) >= MAX_CACHED:
                self._masks.clear()
            self._masks[key] = ((None if keep.all() else keep), (dead if dead.any() else None))
        return self._masks[key]


def _plain_read(expr):
    """``(input name, index symbol names)`` where ``expr`` is one input read at distinct plain
    index symbols in ``LAYOUT``'s axis order (``keep[b, kv_idx]``, which the spec loader
    writes ``Ne(keep[b, kv_idx], 0)``: the same for a bool input), else None."""
    if isinstance(expr, sympy.Ne) and expr.rhs == 0:
        expr = expr.lhs
    if not isinstance(expr, sympy.Indexed):
        return None
    if not all(i.is_Symbol and i.name in INDEX_SYMBOLS for i in expr.indices):
        return None
    names = tuple(i.name for i in expr.indices)
    firsts = [getattr(LAYOUT, n)[0] for n in names]
    if firsts != sorted(set(firsts)):
        return None
    return expr.base.label.name, names


def _ranges(q, sizes: dict) -> dict:
    """The index ranges of the tile (``evaluate``'s promise: ``_env`` holds aranges)."""
    return {"b": q.shape[0], "h": sizes["heads"], "q_idx": q.shape[-2],
            "kv_idx": sizes["seq_k"]}


def _heads(x, kv_heads: int, group: int):
    """A 5-D tile ``(B|1, Hkv|1, G|1, ...)`` as 4-D ``(B|1, H|1, ...)`` for SDPA and outputs
    (a view where it does not vary over heads)."""
    if x.shape[1] == 1 and x.shape[2] == 1:
        return x[:, 0]
    return x.expand(x.shape[0], kv_heads, group, *x.shape[3:]).flatten(1, 2)
