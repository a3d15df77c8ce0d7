"""Block-sparse softmax on CPU as fused SDPA calls over contiguous runs of key blocks.

The plan's query blocks are grouped into *segments* whose key runs move by a constant stride
(``segments.py``). One call of torch's CPU flash-attention kernel
(``_scaled_dot_product_flash_attention_for_cpu``: exp, sums and rescaling fused, log-sum-exp
returned) serves each run of a segment, the query blocks being its batch axis and the keys
overlapping zero-copy ``as_strided`` windows; a run every block reads whole, and a causal
triangle (``is_causal``), take the segment's rows as one tall block instead. Several runs merge
by their log-sum-exps (a lone block with several runs concatenates them instead). The mask
enters as an additive 0/-inf tile only for runs that touch a PARTIAL block, built once per plan
(per input content for masks that read inputs); an additive score_mod joins it (``RunsForward``).

Few, large calls matter beyond their Python overhead: each call is an OpenMP parallel region,
and on a loaded machine every region waits for descheduled threads. Differentiable in q, k and v
through torch's fused CPU flash backward, one call per forward call (``runs_grad.py``).
"""

from __future__ import annotations

from functools import partial

import array_api_compat.torch as xp
import numpy as np
import sympy
import torch

from attncc.lowering.env import Layout
from attncc.passes.strategy import (
    OFFSET,
    additive_bias,
    bias_form,
    is_top_left_causal,
    toeplitz_bias,
)
from attncc.spec.numeric import evaluate
from attncc.spec.symbols import b, kv_idx, q_idx

from .runs_grad import LossyBackward, SegmentCalls, WholeCall, lossy, regroup, rows
from .segments import Run, as_tile, build_segments, calls, causal_squares, run_env, run_mask

NEG_INF = float("-inf")
#: Keys per fused call below which torch's bfloat16 CPU flash backward is slower than float32
#: (its forward is faster at every size).
SHORT_KEYS = 320
#: Whether this CPU has native bfloat16 matmuls (AVX512-BF16 or AMX), which the bfloat16 fused
#: kernels need to beat float32 (on AVX2 alone they convert in software).
NATIVE_BF16 = any(getattr(torch.cpu, f"_is_{isa}_supported", lambda: False)()
                  for isa in ("avx512_bf16", "amx_tile"))


class RunsForward:
    """Forward of a fused node over a plan's segments; holds the (lazily built) mask tiles.

    An additive score_mod (``attncc.passes.strategy.additive_bias``) joins each call's float
    mask: in the ``key`` form only its key term ``bias(q_idx=0)`` (the row term cancels in the
    softmax and is added to the log-sum-exp at the end), O(keys) per call and head; in the
    ``general`` form evaluated over the call's tile. Bias tiles are cached like the masks when
    the bias reads no input, else rebuilt per call from that call's inputs. Where the mask's
    terms are key-form (free of ``q_idx``, padding) beside at most a top-left causal one
    (``whole_call``), one call over all keys serves: those terms join the key tile as -inf,
    rows they leave with no key are marked dead (out 0, lse -inf). Holds no reference to the
    plan (kernels cache runners with their plan as a weak key)."""

    def __init__(self, node, plan, sizes: dict, inputs: dict, device):
        self.mask = node.mask.expr if node.mask is not None else None
        self.sizes = sizes
        self.inputs = inputs
        self._masks: dict = {}
        bias = additive_bias(node.score_mod)
        form = bias_form(bias) if bias is not None else None
        whole = whole_call(node)
        # triangles (causal calls over tall blocks) where a bias tile over them is O(keys)
        group = sizes["heads"] // sizes["kv_heads"]
        tril = partial(causal_squares, self.mask, sizes, inputs, device)
        self.segments = [] if whole else build_segments(
            plan, sizes["batch"], sizes["kv_heads"], group, tril if form in (None, "key") else None)
        self.calls = [calls(seg) for seg in self.segments]
        # bfloat16 trains in float32 where the calls are short (runs_grad.SegmentCalls)
        keys = [sum(r.length for r in c.runs) for cs in self.calls for c in cs]
        self.short = bool(keys) and float(np.median(keys)) < SHORT_KEYS
        self.row = None  # the row term of a key-form bias, for the log-sum-exp
        # no mask and a Toeplitz bias t(q_idx - kv_idx): one call on key-reversed K/V, the
        # bias a zero-copy Hankel view of t over the Nq + Nk - 1 offsets
        self.offsets = toeplitz_bias(bias) if form == "toeplitz" and whole else None
        if form == "key":
            self.row = sympy.expand(bias.subs(kv_idx, 0) - bias.subs({q_idx: 0, kv_idx: 0}))
            bias = sympy.expand(bias.subs(q_idx, 0))
        self.bias = bias
        self._per_call = bias is not None and bool(bias.atoms(sympy.Indexed))
        self._per_batch = bias is not None and b in bias.free_symbols
        # one call over all keys (whole_call), the key terms a tile of stride 0 over the rows
        self.whole = self.offsets is None and whole
        causal, keys = _terms(self.mask)
        self.causal = bool(causal)
        self.key_mask = sympy.And(*keys) if keys else None

    def _tile(self, i: int, j: int, batch: int, inputs: dict, dtype, device):
        """``(float mask or None, dead rows or None, lossy)`` of call ``j`` of segment ``i`` for
        batch entry ``batch``: the mask tile (None where no run of the call touches a PARTIAL
        block) plus the bias tile (see the class docstring); ``lossy`` where the bias reaches
        ``runs_grad.LOSSY_BIAS``."""
        call = self.calls[i][j]
        key = (i, j, dtype, str(device))
        if key not in self._masks:
            self._masks[key] = (None, None) if not any(r.masked for r in call.runs) else run_mask(
                self.mask, call.seg, call.runs, self.sizes, self.inputs, dtype, device)
        mask, dead = self._masks[key]
        if self.bias is None:
            return mask, dead, False
        key = ("bias", i, j, batch if self._per_batch else 0, dtype, str(device))
        if self._per_call or key not in self._masks:
            seg = call.seg
            env, length = run_env(seg, call.runs, batch, self.sizes, inputs, device)
            bias = torch.as_tensor(evaluate(self.bias, env, xp), dtype=dtype, device=device)
            tile = bias if mask is None else mask + bias
            tile = tile.expand(seg.count, seg.nhq, seg.rows, length)
            self._masks[key] = tile, lossy(bias)
        tile, low = self._masks[key]
        return tile, dead, low

    def __call__(self, q, k, v, scale: float, inputs: dict):
        """``(out (B, H, Nq, D), lse (B, H, Nq))`` for ``q (B, H, Nq, D)``, ``k``/``v``
        ``(B, Hkv, Nk, D)`` on CPU, all one floating dtype (bfloat16 computes in bfloat16 in
        the fused kernels, out and lse merge in ``accumulation(dtype)``; a whole call's out
        stays bfloat16); the mask's inputs are those the runner was built with, a bias's those
        of ``inputs``. Differentiable in q, k, v (``runs_grad``). None
        where the fused backward would train wrongly (``runs_grad.lossy``): the caller takes
        the tile loop. A tensor without unit stride in the head dimension is copied first."""
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
        if self.whole:
            tile, dead, low = self._key_tile(q.shape, k.shape[2], inputs,
                                             accumulation(q.dtype))
            if grad and low:
                return None
            out, lse = WholeCall.apply(q, k, v, tile, self.causal, scale, False, dead)
            return out, self._with_row(lse, inputs)
        if self.offsets is not None:
            tile = self._hankel(q.shape, k.shape[2], inputs, accumulation(q.dtype))
            # constant over diagonals: its first row and column hold every value
            if grad and (lossy(tile[:, :, :1, :]) or lossy(tile[:, :, :, :1])):
                return None
            return WholeCall.apply(q, k, v, tile, False, scale, True, None)
        try:
            out, lse = (SegmentCalls.apply(self, q, k, v, scale, inputs) if grad
                        else self.segment_forward(q, k, v, scale, inputs))
        except LossyBackward:
            return None
        return out, self._with_row(lse, inputs)

    def walk(self, k, v, inputs: dict, dtype, device):
        """Per segment and batch entry, ``(segment, batch, kv heads, calls)``; ``calls`` yields,
        lazily, ``(call, keys, values, float mask or None, dead rows or None, lossy)`` of each
        fused call (``segments.Call``; keys and values ``(count, nhk, length, D)`` zero-copy
        windows of the kv heads of the segment's query heads: K/V are never copied per query
        head)."""
        group = self.sizes["heads"] // self.sizes["kv_heads"]
        for i, seg in enumerate(self.segments):
            hk = slice(seg.hq0 // group, (seg.hq0 + seg.nhq - 1) // group + 1)
            for bi in range(seg.b0, seg.b0 + seg.nb):
                yield seg, bi, hk, ((c, *(_keys(x[bi, hk], c.runs, c.seg.count) for x in (k, v)),
                                     *self._tile(i, j, bi, inputs, dtype, device))
                                    for j, c in enumerate(self.calls[i]))

    def segment_forward(self, q, k, v, scale: float, inputs: dict, check: bool = False):
        """``(out, lse)`` of the segment loop, the lse without a key-form row term; raises
        ``LossyBackward`` where ``check`` and a bias tile is lossy."""
        batch, heads, nq, _ = q.shape
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        acc = accumulation(q.dtype)
        out = torch.zeros((batch, heads, nq, v.shape[-1]), dtype=acc, device=q.device)
        lse = torch.full((batch, heads, nq), NEG_INF, dtype=acc, device=q.device)
        for seg, bi, _, each in self.walk(k, v, inputs, acc, q.device):
            o_acc = l_acc = None
            for call, ks, vs, mask, dead, low in each:
                if check and low:
                    raise LossyBackward
                o, lg = flash(rows(q, call.seg, bi), ks, vs, is_causal=call.causal,
                              attn_mask=mask, scale=scale)
                if dead is not None:
                    lg = lg.masked_fill(dead, NEG_INF)
                if call.seg is not seg:  # a tall block's rows back as the segment's blocks
                    o, lg = (regroup(x, seg) for x in (o, lg))
                o_acc, l_acc = (o, lg) if o_acc is None else _merge(o_acc, l_acc, o, lg)
            rows(out, seg, bi).copy_(o_acc)
            rows(lse, seg, bi).copy_(l_acc)
        return out, lse

    def _key_tile(self, shape, seq_k: int, inputs: dict, dtype):
        """``(tile, dead, lossy)`` of a whole call: the key terms over ``(B|1, H|1, Nq, Nk)``
        (the bias's key term, -inf where a key-form mask term drops the key), stride 0 over
        the query rows; the rows left with no key ``(B|1, H|1, Nq)`` (None if none); whether
        the bias is ``runs_grad.lossy``."""
        nb, nh, nq = shape[0], shape[1], shape[2]
        env = _whole_env(self.sizes, inputs, nb, nh, 1, seq_k)
        bias = evaluate(self.bias, env, xp) if self.bias is not None else 0.0
        tile = as_tile(bias, 4, dtype=dtype)
        low = lossy(tile)
        dead = None
        if self.key_mask is not None:
            ranges = {"b": nb, "h": nh, "q_idx": 1, "kv_idx": seq_k}
            keep = as_tile(evaluate(self.key_mask, env, xp, ranges), 4)
            tile = torch.where(keep, tile, NEG_INF)
            # top-left causal: row i sees keys 0..i, so it is empty before the first kept key
            # (every row is, where none is kept: nq may exceed seq_k)
            none = max(nq, seq_k)
            first = torch.where(keep.any(-1), keep.to(torch.uint8).argmax(-1), none)
            dead = (torch.arange(nq) < first if self.causal
                    else (first == none).expand(-1, -1, nq))
            dead = dead if bool(dead.any()) else None
        return tile.expand(tile.shape[0], tile.shape[1], nq, seq_k), dead, low

    def _hankel(self, shape, seq_k: int, inputs: dict, dtype):
        """``(B|1, H|1, Nq, Nk)`` view with ``[.., i, j] = t(i - (Nk - 1 - j))``: the bias for
        key ``Nk - 1 - j`` (keys reversed), from ``t`` over every offset (stride 1 on rows)."""
        fixed = _whole_env(self.sizes, inputs, shape[0], shape[1])
        offsets = WHOLE.place("q_idx", torch.arange(shape[2] + seq_k - 1) - (seq_k - 1))
        t = evaluate(self.offsets, {**fixed, OFFSET.name: offsets}, xp)
        t = as_tile(t, 4, dtype=dtype)[..., 0]
        t = t.expand(t.shape[0], t.shape[1], shape[2] + seq_k - 1).contiguous()
        bs, hs, _ = t.stride()
        return t.as_strided((t.shape[0], t.shape[1], shape[2], seq_k),
                            (bs if t.shape[0] > 1 else 0, hs if t.shape[1] > 1 else 0, 1, 1))

    def _with_row(self, lse, inputs: dict):
        """``lse`` plus the row term of a key-form bias (which the fused calls did not see)."""
        if self.row is None or self.row == 0:
            return lse
        row = evaluate(self.row, _whole_env(self.sizes, inputs, *lse.shape, 1), xp)
        return lse + torch.as_tensor(row, dtype=lse.dtype)[..., 0]


def whole_call(node) -> bool:
    """Whether ``RunsForward`` serves ``node`` by one ``WholeCall`` (differentiable in q, k,
    v): a Toeplitz bias and no mask; or a key-form bias or none, with mask terms that are
    key-form (free of ``q_idx``: padding ``keep[b, kv_idx]``) and at most one top-left causal
    term, and something beside that causal term (else the sdpa path serves it)."""
    bias = additive_bias(node.score_mod)
    form = bias_form(bias) if bias is not None else None
    causal, keys = _terms(node.mask.expr if node.mask is not None else None)
    if form == "toeplitz":
        return not causal and not keys
    return (form in (None, "key") and len(causal) <= 1 and (form == "key" or bool(keys))
            and all(q_idx not in t.free_symbols for t in keys))


def _terms(mask) -> tuple[list, list]:
    """The conjuncts of ``mask`` (none for no mask): the top-left causal ones, the others."""
    terms = sympy.And.make_args(mask) if mask is not None else ()
    causal = [t for t in terms if is_top_left_causal(t)]
    return causal, [t for t in terms if t not in causal]


def accumulation(dtype):
    """The dtype of the merged out and lse and of the mask and bias tiles for fused calls on
    ``dtype`` inputs: float32 for bfloat16 (the kernels accumulate in float32 inside and take
    float32 masks), else ``dtype``."""
    return torch.float32 if dtype == torch.bfloat16 else dtype


#: Where b, h, q_idx, kv_idx sit in a whole-call tile ``(B, H, Nq, Nk)``.
WHOLE = Layout(4, b=(0,), h=(1,), q_idx=(2,), kv_idx=(3,))


def _whole_env(sizes: dict, inputs: dict, nb: int, nh: int, rows=None, keys=None) -> dict:
    """The ``WHOLE`` environment of ``nb`` batch entries and ``nh`` heads; with ``rows`` and
    ``keys``, query and key positions ``arange(rows)``, ``arange(keys)`` too."""
    fixed = WHOLE.fixed(sizes, inputs, torch.arange(nb), torch.arange(nh))
    return fixed if rows is None else WHOLE.env(fixed, torch.arange(rows), torch.arange(keys))


def _keys(x, runs: tuple[Run, ...], count: int):
    """The keys ``(count, H, length, D)`` of one call from ``x (H, N, D)``: several runs of a
    lone block side by side, or one run's overlapping windows, window ``i`` starting at key
    ``run.start + i * run.stride`` (views, no copy)."""
    if len(runs) > 1:
        return torch.cat([x[:, r.start:r.start + r.length] for r in runs], dim=1)[None]
    run = runs[0]
    sh, sn, sd = x.stride()
    return x.as_strided((count, x.shape[0], run.length, x.shape[2]),
                        (run.stride * sn, sh, sn, sd), x.storage_offset() + run.start * sn)


def _merge(o1, l1, o2, l2):
    """Softmax over the union of two key sets from each one's output and log-sum-exp."""
    lse = torch.logaddexp(l1, l2)
    safe = torch.where(lse == NEG_INF, 0.0, lse)
    w1, w2 = torch.exp(l1 - safe)[..., None], torch.exp(l2 - safe)[..., None]
    return o1 * w1 + o2 * w2, lse
