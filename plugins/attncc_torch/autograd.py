"""``torch.autograd.Function`` around the flash pattern: saves O(N) tensors, recomputes tiles.

Saved: q, k, v, out and per-row statistics; never a score matrix.
"""

from __future__ import annotations

import torch

from . import flash
from .tiles import Problem


class FlashAttention(torch.autograd.Function):
    """``apply(problem, names, q5, k4, v4, *tensors) -> (out5, lse5)``.

    Inside, q, k, v are block-major, ``(nQ, B, Hkv, group, block_m, D)`` and
    ``(nK, B, Hkv, block_n, D)`` (``Problem.to_blocks``), so that a step's gathers are
    ``index_select`` along dim 0 and its results one ``index_copy_`` / ``index_add_``.
    ``tensors`` are the floating inputs named by ``names`` (in the compute dtype), which receive
    gradients; integer inputs live in ``problem.inputs``. ``lse5`` is not differentiable (it is
    empty for sigmoid, which has none).
    """

    @staticmethod
    def forward(ctx, pb: Problem, names: tuple, q5, k4, v4, *tensors):
        inputs = {**pb.inputs, **dict(zip(names, tensors, strict=True))}
        q6, kb, vb = pb.to_blocks(q5), pb.to_kv_blocks(k4), pb.to_kv_blocks(v4)
        out6, rows = flash.forward(pb, q6, kb, vb, inputs)
        lse = pb.from_blocks(rows["lse"]) if rows["lse"] is not None else q5.new_empty(0)
        ctx.pb, ctx.names = pb, names
        ctx.row_names = tuple(n for n, x in rows.items() if x is not None)
        ctx.save_for_backward(q6, kb, vb, out6, *(rows[n] for n in ctx.row_names), *tensors)
        ctx.mark_non_differentiable(lse)
        return pb.from_blocks(out6), lse

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
        saved = {"q6": q5, "k4": k4, "v4": v4, "out6": out, "inputs": inputs, "rows": rows}
        dq6, dk, dv, dinp = flash.backward(pb, saved, pb.to_blocks(dout), wanted)
        return (None, None, pb.from_blocks(dq6), pb.from_kv_blocks(dk), pb.from_kv_blocks(dv),
                *(dinp.get(name) for name in names))
