"""The Triton kernels as ``torch.library.triton_op``s: what ``TritonKernel.torch_op`` returns.

One set of operators per compiled (spec, config), named with the spec hash and a config digest
(``TAG``); each ``triton_op`` has a shape-only ``register_fake``, each forward a
``register_autograd`` calling its backward ``triton_op``. Fused attention (and Linformer, whose
projections ``E @ k``, ``F @ v`` are torch ops around the fused kernel) has three (``FusedOps``):

- ``attncc::triton_plan_TAG(q, k, v, inputs) -> Tensor[8]``: an opaque ``custom_op`` that checks
  the call (attncc's prologue) and gives the block plan (``attncc.plan``) as the eight int32
  index tables, padded so that their shapes follow from the sizes alone (its fake needs no
  data); masks that read inputs (document ids, lengths) are classified here, from the tensors;
- ``attncc::triton_TAG(q, k, v, inputs, tables, scale) -> (out, lse, thr)``: torch ops and
  ``wrap_triton(kernel)[grid](...)`` launches of the generated forward kernel;
- ``attncc::triton_TAG_backward(...) -> Tensor[]``: launches of the dq and dk/dv kernels.

Linear attention and Nyström have their forward/backward pair in ``ops_lowrank.py``.

On a GPU, AOTAutograd decomposes the ``triton_op``s, so Inductor sees the Triton kernels
themselves. Under ``TRITON_INTERPRET=1`` it cannot: ``wrap_triton`` then returns the bare
``InterpretedFunction`` (torch keeps the traceable wrapper for ``JITFunction``s, whose JIT
metadata the interpreter lacks; pytorch#152868, #185597), and launching that on fake or
functional tensors fails. There the operators stay whole in the graph (as ``torch.export``
keeps ``triton_op``s) and run their eager body on real tensors.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from torch import Tensor

from attncc.lowering.lowrank import linformer

from .runtime import TABLES, acc_dtype

_OPS: dict = {}
_PLAN = "(Tensor q, Tensor k, Tensor v, Tensor[] inputs) -> Tensor[]"


def tag(kernel) -> str:
    """``<spec hash[:16]>_<config digest[:8]>``: the operators' name suffix."""
    config = hashlib.sha256(json.dumps(kernel.config, sort_keys=True).encode()).hexdigest()
    return f"{kernel.spec.hash[:16]}_{config[:8]}"


def _keep_whole(mode, op, types, args, kwargs):
    """FunctionalTensorMode rule: no decomposition, the operator stays one graph node."""
    return mode.__torch_dispatch__(op, types, args, kwargs)


def define(ops, name: str):
    """The ``triton_op``s ``attncc::<name>`` and ``attncc::<name>_backward`` from ``ops``'s
    ``_forward``, ``_backward``, their ``_fake``s, ``_grad`` and ``_setup_context``; kept whole
    under the interpreter."""
    fwd = torch.library.triton_op(f"attncc::{name}", ops._forward, mutates_args=())
    fwd.register_fake(ops._forward_fake)
    bwd = torch.library.triton_op(f"attncc::{name}_backward", ops._backward, mutates_args=())
    bwd.register_fake(ops._backward_fake)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        from torch._subclasses.functional_tensor import FunctionalTensorMode

        for operator in (fwd, bwd):
            operator.register_torch_dispatch(FunctionalTensorMode, _keep_whole)
    fwd.register_autograd(ops._grad, setup_context=ops._setup_context)
    return fwd, bwd


def registered(kernel, ops_class):
    """The operators of ``kernel`` (made once per spec hash and config) as a function
    ``fn(q, k, v, **inputs) -> out``; ``fn.op`` is the forward operator, ``fn.args(q, k, v,
    **inputs)`` its arguments for a call, ``fn.ops`` the set (``forward``, ``backward``, and
    ``plan`` for fused kernels)."""
    key = tag(kernel)
    if key not in _OPS:
        _OPS[key] = ops_class(kernel)
    ops, names = _OPS[key], tuple(kernel.spec.inputs)

    def args(q, k, v, **inputs):
        return ops.args(q, k, v, [inputs[n] for n in names])

    def fn(q, k, v, **inputs):
        return ops.forward(*args(q, k, v, **inputs))[0]

    fn.op, fn.args, fn.ops = ops.forward, args, ops
    return fn


def per_input(tensors, grads) -> list:
    """One gradient per spec input: the next of ``grads`` for a floating one, else None."""
    rest = iter(grads)
    return [next(rest) if x.is_floating_point() else None for x in tensors]


def floating_like(tensors) -> list:
    """``empty_like`` of every floating tensor: the fakes' input gradients."""
    return [torch.empty_like(x) for x in tensors if x.is_floating_point()]


class FusedOps:
    """The three operators of a fused kernel (Linformer included) and the glue between them."""

    def __init__(self, kernel):
        self.kernel, self.program = kernel, kernel.program
        self.names = tuple(kernel.spec.inputs)
        self.block_m, self.block_n = kernel.config["block_m"], kernel.config["block_n"]
        mask = kernel.node.mask
        self.varies = mask.varies_with if mask is not None else ()
        self.rank = kernel.node.projection or 0
        self.plan = torch.library.custom_op(f"attncc::triton_plan_{tag(kernel)}", self._plan,
                                            mutates_args=(), schema=_PLAN)
        self.plan.register_fake(self._plan_fake)
        self.forward, self.backward = define(self, f"triton_{tag(kernel)}")

    # plan --------------------------------------------------------------------------------------
    def _plan(self, q, k, v, inputs):
        call = self.kernel.prologue(q, k, v, dict(zip(self.names, inputs, strict=True)))
        tables = self.kernel.tables(call.sizes, call.raw_inputs, q.device, padded=True)
        return [tables[n].clone() for n in TABLES]

    def _plan_fake(self, q, k, v, inputs):
        b = q.shape[0] if "b" in self.varies else 1
        h = q.shape[1] if "h" in self.varies else 1
        n_q, n_k = -(-q.shape[2] // self.block_m), -(-(self.rank or k.shape[2]) // self.block_n)

        def table(*shape):
            return q.new_empty(shape, dtype=torch.int32)

        return [table(b, h, n_q), table(b, h, n_q, n_k), table(b, h, n_q), table(b, h, n_q, n_k),
                table(b, h, n_k), table(b, h, n_k, n_q), table(b, h, n_k), table(b, h, n_k, n_q)]

    # forward -----------------------------------------------------------------------------------
    def _launch_args(self, q, k, v, inputs, tables):
        named = dict(zip(self.names, inputs, strict=True))
        if self.rank:
            k, v = linformer(k, v, named["E"].to(k.dtype), named["F"].to(v.dtype))
        return q, k, v, named, dict(zip(TABLES, tables, strict=True))

    def _forward(self, q: Tensor, k: Tensor, v: Tensor, inputs: list[Tensor],
                 tables: list[Tensor], scale: float) -> tuple[Tensor, Tensor, Tensor]:
        return self.program.forward(*self._launch_args(q, k, v, inputs, tables), scale,
                                    wrap=torch.library.wrap_triton)

    def _forward_fake(self, q, k, v, inputs, tables, scale):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=acc_dtype(q.dtype))
        return out, lse, torch.empty_like(lse)

    # backward ----------------------------------------------------------------------------------
    def _backward(self, q: Tensor, k: Tensor, v: Tensor, inputs: list[Tensor],
                  tables: list[Tensor], scale: float, out: Tensor, lse: Tensor, thr: Tensor,
                  d_out: Tensor, d_lse: Tensor) -> list[Tensor]:
        dq, dk, dv, grads = self.program.backward(
            *self._launch_args(q, k, v, inputs, tables), scale, out, lse, thr, d_out, d_lse,
            wrap=torch.library.wrap_triton)
        named = dict(zip(self.names, inputs, strict=True))
        if self.rank:  # k' = E k, v' = F v: back through the projections (torch)
            acc = lse.dtype
            for x, dx, proj in ((k, dk, "E"), (v, dv, "F")):
                grads[proj] = (dx.to(acc) @ x.to(acc).transpose(-1, -2)).sum((0, 1))
            dk = (named["E"].to(acc).transpose(0, 1) @ dk.to(acc)).to(k.dtype)
            dv = (named["F"].to(acc).transpose(0, 1) @ dv.to(acc)).to(v.dtype)
        floats = [grads[n].to(x.dtype) for n, x in named.items() if x.is_floating_point()]
        return [dq, dk, dv, *floats]

    def _backward_fake(self, q, k, v, inputs, tables, scale, out, lse, thr, d_out, d_lse):
        return floating_like((q, k, v, *inputs))

    def _setup_context(self, ctx, inputs, output):
        q, k, v, tensors, tables, scale = inputs
        ctx.scale, ctx.n_inputs = scale, len(tensors)
        ctx.save_for_backward(q, k, v, *output, *tensors, *tables)

    def _grad(self, ctx, d_out, d_lse, d_thr):
        q, k, v, out, lse, thr, *rest = ctx.saved_tensors
        tensors, tables = rest[:ctx.n_inputs], rest[ctx.n_inputs:]
        d_out = torch.zeros_like(out) if d_out is None else d_out
        d_lse = torch.zeros_like(lse) if d_lse is None else d_lse
        grads = self.backward(q, k, v, list(tensors), list(tables), ctx.scale, out, lse, thr,
                              d_out.contiguous(), d_lse.contiguous())
        return (*grads[:3], per_input(tensors, grads[3:]), [None] * len(tables), None)

    # the call ----------------------------------------------------------------------------------
    def args(self, q, k, v, inputs: list):
        """The forward operator's arguments for this call (plan tables built now)."""
        tables = self.plan(q.detach(), k.detach(), v.detach(), [x.detach() for x in inputs])
        return q, k, v, inputs, tables, self.program.scale(q, k, v)
