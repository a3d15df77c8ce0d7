"""``torch.autograd.Function`` around the flash pattern: saves O(N) tensors, recomputes tiles."""

from __future__ import annotations

import torch

from . import flash
from .tiles import Problem


class FlashAttention(torch.autograd.Function):
    """``apply(problem, names, q5, k4, v4, *tensors) -> (out5, lse5)``.

    ``tensors`` are the floating inputs named by ``names`` (in the compute dtype), which receive
    gradients; integer inputs live in ``problem.inputs``. ``lse5`` is not differentiable (it is
    empty for sigmoid, which has none).
    """

    @staticmethod
    def forward(ctx, pb: Problem, names: tuple, q5, k4, v4, *tensors):
        inputs = {**pb.inputs, **dict(zip(names, tensors, strict=True))}
        out, lse, thr = flash.forward(pb, q5, k4, v4, inputs)
        if lse is None:
            lse = q5.new_empty(0)
        ctx.pb, ctx.names = pb, names
        ctx.has_thr = thr is not None
        ctx.save_for_backward(q5, k4, v4, out, lse, *([thr] if thr is not None else []),
                              *tensors)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        pb, names = ctx.pb, ctx.names
        q5, k4, v4, out, lse, *rest = ctx.saved_tensors
        thr = rest.pop(0) if ctx.has_thr else None
        tensors = rest
        inputs = {**pb.inputs, **dict(zip(names, tensors, strict=True))}
        wanted = [name for i, name in enumerate(names) if ctx.needs_input_grad[5 + i]]
        saved = {"q5": q5, "k4": k4, "v4": v4, "out5": out, "inputs": inputs,
                 "lse": lse if lse.numel() else None, "thr": thr}
        dq, dk, dv, dinp = flash.backward(pb, saved, dout.contiguous(), wanted)
        return (None, None, dq, dk, dv, *(dinp.get(name) for name in names))
