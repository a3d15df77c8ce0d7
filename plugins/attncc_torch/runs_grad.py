"""Backward of the fused-runs path (``runs.py``): torch's fused CPU flash backward per call.

Two ``torch.autograd.Function``s, differentiable in q, k and v (never in the mask or bias tiles:
a bias input that needs a gradient takes the tile loop, ``flash.py``, exact and deterministic):

- ``WholeCall``: one fused call over all keys (key-form mask terms and bias, beside at most a
  top-left causal term; a Toeplitz bias on key-reversed K/V);
- ``SegmentCalls``: the segment loop of ``RunsForward`` (one call per run of key blocks, several
  runs merged by log-sum-exp). Its backward walks the same calls again and passes each one
  ``_scaled_dot_product_flash_attention_for_cpu_backward(dout, q_c, k_c, v_c, out_c, lse_c, ...)``
  with the GLOBAL (merged) ``out`` and ``lse`` sliced to that call's rows. The fused backward
  recomputes ``P = exp(S - lse)`` and ``D = rowsum(dO * O)`` from what it is given, so with the
  global out and lse each call's dq, dk, dv are exactly its key subset's share of the full
  gradient, and their sum over calls is the gradient. Rows with no kept key (lse -inf) get lse
  +inf there (P = 0, no gradient). dq adds into the call's rows; dk and dv of the overlapping
  ``as_strided`` key windows go back to their key positions by one ``index_add_`` per call
  (duplicates accumulate; deterministic on CPU). GQA: the fused backward returns kv-head dk, dv.

Both keep q, k, v, out and lse, and ``WholeCall`` its key-form tile (an expanded view of O(N)
elements): memory O(N); ``SegmentCalls``' mask and bias tiles are the runner's (cached, or
rebuilt from the inputs in the backward).
"""

from __future__ import annotations

import torch

from .segments import positions

NEG_INF = float("-inf")
#: Bias values below this lose the row sum in a fused backward (see ``lossy``).
LOSSY_BIAS = -float(1 << 20)


class LossyBackward(Exception):  # noqa: N818 - read as an outcome
    """A fused backward would get this call's gradients wrong (``lossy``): the caller takes the
    tile loop."""


def lossy(bias) -> bool:
    """Whether a fused backward over a tile holding ``bias`` could get its gradients wrong: it
    recomputes ``p = exp(s - lse)`` from ``lse = max + log(sum)``, and where every key of a row
    carries a bias as large as transformers' padding (the dtype's minimum), ``log(sum)``
    vanishes below the bias's rounding step, so each ``p`` comes out 1 instead of 1/n."""
    return bool(float(bias.amin()) < LOSSY_BIAS)


def rows(x, seg, batch: int):
    """The view ``(count, nhq, rows, ...)`` of segment ``seg``'s query rows of ``x[batch]`` for
    ``x (B, H, Nq, ...)`` (out, lse, their gradients): block ``i`` on the leading axis."""
    hs = slice(seg.hq0, seg.hq0 + seg.nhq)
    span = slice(seg.r0, seg.r0 + seg.count * seg.rows)
    return x[batch, hs, span].unflatten(1, (seg.count, seg.rows)).transpose(0, 1)


def regroup(x, seg):
    """``x (1, nhq, count * rows, ...)`` of a tall block (``segments.tall``) as ``seg``'s
    blocks ``(count, nhq, rows, ...)``, the layout of ``rows``."""
    return x[0].unflatten(1, (seg.count, seg.rows)).transpose(0, 1)


class SegmentCalls(torch.autograd.Function):
    """``apply(runner, q, k, v, scale, inputs) -> (out, lse)``: ``runner.segment_forward`` (a
    ``runs.RunsForward``) with the backward of the module docstring. ``lse`` is the one the
    fused calls saw (no row term) and is not differentiable. Raises ``LossyBackward`` where a
    bias tile is ``lossy``."""

    @staticmethod
    def forward(ctx, runner, q, k, v, scale: float, inputs: dict):
        out, lse = runner.segment_forward(q, k, v, scale, inputs, check=True)
        ctx.runner, ctx.scale, ctx.inputs = runner, scale, inputs
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q0, k0, v0, out, lse = ctx.saved_tensors
        fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        lse = lse.masked_fill(lse == NEG_INF, float("inf"))
        # bfloat16: the fused backward runs in bfloat16 over long calls, else (``runner.short``,
        # where it is slower) in float32; it takes out and dout in q's dtype; dq, dk, dv sum
        # over the calls in the merged lse's dtype (float32)
        acc = lse.dtype
        work = acc if ctx.runner.short else q0.dtype
        q, k, v = (x.to(work) for x in (q0, k0, v0))
        dout, out = dout.to(work).contiguous(), out.to(work)
        dq, dk, dv = (torch.zeros_like(x, dtype=acc) for x in (q, k, v))
        for _, bi, hk, calls in ctx.runner.walk(k, v, ctx.inputs, acc, q.device):
            for call, ks, vs, mask, _dead, _lossy in calls:
                qs, outs, lses, douts = (rows(x, call.seg, bi) for x in (q, out, lse, dout))
                dq_c, dk_c, dv_c = fused(douts, qs, ks, vs, outs, lses, 0.0, call.causal,
                                         attn_mask=mask, scale=ctx.scale)
                rows(dq, call.seg, bi).add_(dq_c)
                at = positions(call.runs, call.seg.count, q.device).flatten()
                dk[bi, hk].index_add_(1, at, dk_c.transpose(0, 1).flatten(1, 2).to(acc))
                dv[bi, hk].index_add_(1, at, dv_c.transpose(0, 1).flatten(1, 2).to(acc))
        return None, dq.to(q0.dtype), dk.to(k0.dtype), dv.to(v0.dtype), None, None


class WholeCall(torch.autograd.Function):
    """``apply(q, k, v, tile, causal, scale, flip, dead) -> (out, lse)``: one fused CPU flash
    call over all keys (reversed where ``flip``) with the float mask ``tile``, and its fused
    backward (dq, and dk, dv with kv-head shapes for GQA). The tile is a constant. ``dead``
    (bool, broadcasting to lse, or None) marks rows the tile leaves no key: their out is 0 and
    their lse -inf (+inf for the backward: P = 0, no gradient). ``lse`` is not
    differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, tile, causal: bool, scale: float, flip: bool, dead):
        if flip:
            k, v = k.flip(2), v.flip(2)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, is_causal=causal, attn_mask=tile, scale=scale)
        saved = lse
        if dead is not None:
            out = out.masked_fill(dead[..., None], 0.0)
            saved = lse.masked_fill(dead, float("inf"))
            lse = lse.masked_fill(dead, NEG_INF)
        ctx.causal, ctx.scale, ctx.flip = causal, scale, flip
        ctx.save_for_backward(q, k, v, out, saved, tile)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, tile = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.contiguous(), q, k, v, out, lse, 0.0, ctx.causal, attn_mask=tile,
            scale=ctx.scale)
        if ctx.flip:
            dk, dv = dk.flip(2), dv.flip(2)
        return dq, dk, dv, None, None, None, None, None
