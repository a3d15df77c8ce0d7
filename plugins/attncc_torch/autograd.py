"""``torch.autograd.Function`` around the flash pattern: saves O(N) tensors, recomputes tiles.

Saved: q, k, v, out and per-row statistics; never a score matrix.
"""

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
        out, rows = flash.forward(pb, q5, k4, v4, inputs)
        lse = rows["lse"] if rows["lse"] is not None else q5.new_empty(0)
        ctx.pb, ctx.names = pb, names
        ctx.row_names = tuple(n for n, x in rows.items() if x is not None)
        ctx.save_for_backward(q5, k4, v4, out, *(rows[n] for n in ctx.row_names), *tensors)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        pb, names = ctx.pb, ctx.names
        q5, k4, v4, out, *rest = ctx.saved_tensors
        n_rows = len(ctx.row_names)
        rows = dict.fromkeys(("lse", "m", "inv_l", "thr"))
        rows.update(zip(ctx.row_names, rest[:n_rows], strict=True))
        tensors = rest[n_rows:]
        inputs = {**pb.inputs, **dict(zip(names, tensors, strict=True))}
        wanted = [name for i, name in enumerate(names) if ctx.needs_input_grad[5 + i]]
        saved = {"q5": q5, "k4": k4, "v4": v4, "out5": out, "inputs": inputs, "rows": rows}
        dq, dk, dv, dinp = flash.backward(pb, saved, dout.contiguous(), wanted)
        return (None, None, dq, dk, dv, *(dinp.get(name) for name in names))
