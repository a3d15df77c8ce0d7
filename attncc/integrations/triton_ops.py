"""Triton kernels as ``torch.library.triton_op``s, one set per compiled (spec, config).

Every lowering of the Triton backend has its operators, named with the spec hash and a config
digest (``TAG``); each ``triton_op`` has a shape-only ``register_fake``, and each forward a
``register_autograd`` calling its backward ``triton_op``:

- fused attention (and Linformer, whose projections ``E @ k``, ``F @ v`` are torch ops around the
  fused kernel; ``_Ops`` here):

  - ``attncc::triton_plan_TAG(q, k, v, inputs) -> Tensor[8]``: an opaque ``custom_op`` that
    validates the call (``attncc.bind``) and builds the block plan (``attncc.plan``, NumPy) as
    the eight int32 index tables, padded to the full block axis so their shapes follow from the
    sizes alone (its fake needs no data). Masks that read inputs (document ids, lengths) are
    classified here, from the real tensors.
  - ``attncc::triton_TAG(q, k, v, inputs, tables, scale) -> (out, lse, thr)``: torch ops and
    ``wrap_triton(kernel)[grid](...)`` launches of the generated forward kernel.
  - ``attncc::triton_TAG_backward(...) -> Tensor[]``: launches of the generated dq and dk/dv
    kernels.
- linear attention (``triton_linear.py``): ``attncc::triton_TAG(q, k, v, inputs) -> (out, den)``
  and its backward, the chunked scan kernels ``_linear`` / ``_linear_bwd``.
- Nyström (``triton_nystrom.py``): ``attncc::triton_TAG(q, k, v, scale) -> (out, ...)`` and its
  backward, the dense fused kernels twice plus torch ops (landmarks, softmax, pinv).

On a GPU, AOTAutograd decomposes the ``triton_op``s, so Inductor sees the Triton kernels
themselves. Under ``TRITON_INTERPRET=1`` it cannot: ``wrap_triton`` then returns the bare
``InterpretedFunction`` (torch keeps the traceable wrapper for ``JITFunction``s, whose JIT
metadata the interpreter lacks; pytorch#152868, #185597), and launching that on fake or
functional tensors fails. There, the operators stay whole in the graph (as ``torch.export``
keeps ``triton_op``s) and run their eager body on real tensors.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch
from torch import Tensor

from attncc.bind import bind
from attncc.plan import build_plan

__all__ = ["TABLES", "acc_dtype", "define", "triton_ops"]

#: Order of the plan tables in the plan operator's output and the forward operator's input.
TABLES = ("fc", "fi", "pc", "pi", "fct", "fit", "pct", "pit")
_OPS: dict = {}

_PLAN = "(Tensor q, Tensor k, Tensor v, Tensor[] inputs) -> Tensor[]"


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tag(kernel) -> str:
    """``<spec hash[:16]>_<config digest[:8]>``: the operators' name suffix."""
    config = hashlib.sha256(json.dumps(kernel.config, sort_keys=True).encode()).hexdigest()
    return f"{kernel.spec.hash[:16]}_{config[:8]}"


def _keep_whole(mode, op, types, args, kwargs):
    """FunctionalTensorMode rule: no decomposition, the operator stays one graph node."""
    return mode.__torch_dispatch__(op, types, args, kwargs)


def define(name: str, forward, forward_fake, backward, backward_fake, grad, setup_context):
    """The ``triton_op``s ``attncc::<name>`` and ``attncc::<name>_backward`` with their fakes,
    kept whole under the interpreter, the forward's autograd calling ``grad``."""
    fwd = torch.library.triton_op(f"attncc::{name}", forward, mutates_args=())
    fwd.register_fake(forward_fake)
    bwd = torch.library.triton_op(f"attncc::{name}_backward", backward, mutates_args=())
    bwd.register_fake(backward_fake)
    if _interpreted():
        from torch._subclasses.functional_tensor import FunctionalTensorMode

        for operator in (fwd, bwd):
            operator.register_torch_dispatch(FunctionalTensorMode, _keep_whole)
    fwd.register_autograd(grad, setup_context=setup_context)
    return fwd, bwd


def scale_of(module, q, k, v) -> float:
    """The spec's score scale for this call (sizes before any projection)."""
    return float(module.SPEC["scale"](
        batch=q.shape[0], heads=q.shape[1], kv_heads=k.shape[1], seq_q=q.shape[2],
        seq_k=k.shape[2], head_dim=q.shape[3], value_dim=v.shape[3]))


def acc_dtype(dtype) -> torch.dtype:
    """The kernels' accumulation dtype for tensors of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cdiv(a, b):
    return (a + b - 1) // b


class _Ops:
    """The three operators of a fused kernel (Linformer included) and the glue between them."""

    def __init__(self, kernel):
        self.kernel, self.module = kernel, kernel.module
        self.names = tuple(kernel.spec.inputs)
        spec = self.module.SPEC
        self.block_m, self.block_n = kernel.config["block_m"], kernel.config["block_n"]
        self.plan_b, self.plan_h = spec["plan_b"], spec["plan_h"]
        lowrank = kernel.spec.lowrank
        self.rank = lowrank.size if lowrank is not None and lowrank.method == "linformer" else 0
        self.plan = torch.library.custom_op(f"attncc::triton_plan_{tag(kernel)}", self._plan,
                                            mutates_args=(), schema=_PLAN)
        self.plan.register_fake(self._plan_fake)
        self.forward, self.backward = define(
            f"triton_{tag(kernel)}", self._forward, self._forward_fake, self._backward,
            self._backward_fake, self._grad, self._setup_context)

    # plan --------------------------------------------------------------------------------------
    def _plan_shape(self, q, k):
        b = q.shape[0] if self.plan_b else 1
        h = q.shape[1] if self.plan_h else 1
        return b, h, _cdiv(q.shape[2], self.block_m), _cdiv(self.rank or k.shape[2], self.block_n)

    def _plan(self, q, k, v, inputs):
        bound = bind(self.kernel.spec, q, k, v, dict(zip(self.names, inputs, strict=True)))
        plan = build_plan(self.kernel.spec, bound.sizes, self.block_m, self.block_n,
                          inputs=bound.inputs)
        states = np.broadcast_to(plan.states, self._plan_shape(q, k)).copy()
        tables = self.module.tables_from_states(torch.from_numpy(states).to(q.device),
                                                padded=True)
        return [tables[n].contiguous() for n in TABLES]

    def _plan_fake(self, q, k, v, inputs):
        b, h, n_q, n_k = self._plan_shape(q, k)

        def table(*shape):
            return q.new_empty(shape, dtype=torch.int32)

        return [table(b, h, n_q), table(b, h, n_q, n_k), table(b, h, n_q), table(b, h, n_q, n_k),
                table(b, h, n_k), table(b, h, n_k, n_q), table(b, h, n_k), table(b, h, n_k, n_q)]

    # forward -----------------------------------------------------------------------------------
    def _project(self, k, v, named: dict):
        """Linformer's ``(E @ k, F @ v)``; ``(k, v)`` for other specs."""
        if not self.rank:
            return k, v
        return named["E"].to(k.dtype) @ k, named["F"].to(v.dtype) @ v

    def _launch_args(self, q, k, v, inputs, tables, scale):
        m = self.module
        named = dict(zip(self.names, inputs, strict=True))
        k, v = self._project(k, v, named)
        return (m._KERNELS, m.SPEC, m.CONFIG, q, k, v, named,
                dict(zip(TABLES, tables, strict=True)), scale)

    def _forward(self, q: Tensor, k: Tensor, v: Tensor, inputs: list[Tensor],
                 tables: list[Tensor], scale: float) -> tuple[Tensor, Tensor, Tensor]:
        return self.module.launch_forward(*self._launch_args(q, k, v, inputs, tables, scale),
                                          wrap=torch.library.wrap_triton)

    def _forward_fake(self, q, k, v, inputs, tables, scale):
        acc = acc_dtype(q.dtype)
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=acc)
        return out, lse, torch.empty_like(lse)

    # backward ----------------------------------------------------------------------------------
    def _backward(self, q: Tensor, k: Tensor, v: Tensor, inputs: list[Tensor],
                  tables: list[Tensor], scale: float, out: Tensor, lse: Tensor, thr: Tensor,
                  d_out: Tensor, d_lse: Tensor) -> list[Tensor]:
        dq, dk, dv, grads = self.module.launch_backward(
            *self._launch_args(q, k, v, inputs, tables, scale), out, lse, thr, d_out, d_lse,
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
        return [torch.empty_like(x) for x in (q, k, v, *(x for x in inputs
                                                         if x.is_floating_point()))]

    def _setup_context(self, ctx, inputs, output):
        q, k, v, tensors, tables, scale = inputs
        out, lse, thr = output
        ctx.scale, ctx.n_inputs = scale, len(tensors)
        ctx.save_for_backward(q, k, v, out, lse, thr, *tensors, *tables)

    def _grad(self, ctx, d_out, d_lse, d_thr):
        q, k, v, out, lse, thr, *rest = ctx.saved_tensors
        tensors, tables = rest[:ctx.n_inputs], rest[ctx.n_inputs:]
        d_out = torch.zeros_like(out) if d_out is None else d_out
        d_lse = torch.zeros_like(lse) if d_lse is None else d_lse
        grads = self.backward(q, k, v, list(tensors), list(tables), ctx.scale, out, lse, thr,
                              d_out.contiguous(), d_lse.contiguous())
        return (*grads[:3], per_input(tensors, grads[3:]), [None] * len(tables), None)

    # the call ----------------------------------------------------------------------------------
    def scale(self, q, k, v) -> float:
        return scale_of(self.module, q, k, v)

    def args(self, q, k, v, inputs: list):
        """The forward operator's arguments for this call (plan tables built now)."""
        tables = self.plan(q.detach(), k.detach(), v.detach(), [x.detach() for x in inputs])
        return q, k, v, inputs, tables, self.scale(q, k, v)

    def __call__(self, q, k, v, inputs: list):
        return self.forward(*self.args(q, k, v, inputs))[0]


def per_input(tensors, grads) -> list:
    """One gradient per spec input: the next of ``grads`` for a floating one, else None."""
    rest = iter(grads)
    return [next(rest) if x.is_floating_point() else None for x in tensors]


def triton_ops(kernel):
    """The operators of a Triton ``kernel`` (registered once per spec hash and config):
    ``forward``, ``backward``, ``args(q, k, v, inputs)`` (the forward's arguments; its first
    output is the attention output) and, for fused kernels, ``plan``."""
    key = tag(kernel)
    if key not in _OPS:
        if kernel.kind == "linear":
            from attncc.integrations.triton_linear import LinearOps as Ops
        elif kernel.kind == "nystrom":
            from attncc.integrations.triton_nystrom import NystromOps as Ops
        else:
            Ops = _Ops
        _OPS[key] = Ops(kernel)
    return _OPS[key]
