"""The Triton kernels as ``torch.library.triton_op``s: what ``TritonKernel.torch_op`` returns.

One set of operators per compiled (spec, config), named with the spec hash and a config digest
(``TAG``). Each set (``TritonOps``) has a forward ``attncc::triton_TAG`` and its backward
``attncc::triton_TAG_backward``, both with a shape-only ``register_fake``, the forward with a
``register_autograd`` calling the backward. The operators wrap the launches of the generated
module's host runtime (``Program``); what torch expresses around a kernel (Linformer's
projections ``E @ k``, ``F @ v``, linear attention's feature maps φ) are torch ops before the
operator, in ``fn.args``, differentiated by torch autograd.

- Fused attention (``FusedOps``, Linformer included): ``attncc::triton_plan_TAG(q, k, v, inputs)
  -> Tensor[8]``, an opaque ``custom_op`` that checks the call (attncc's prologue) and gives the
  block plan (``attncc.plan``) as the eight int32 index tables, padded so that their shapes
  follow from the sizes alone (its fake needs no data; masks that read inputs are classified
  here, from the tensors); ``triton_TAG(q, k, v, inputs, tables, scale) -> (out, lse, thr)``,
  the forward kernel; its backward launches the dq and dk/dv kernels.
- Linear attention (``LinearOps``): ``triton_TAG(phi_q, phi_k, v) -> (out, den)``, one launch of
  the chunked ``_linear`` kernel and ``den`` (B, H, Nq), the row sums ``Σ_j φq_i·φk_j`` it divides
  by; its backward, one launch of ``_linear_bwd``.
- Nyström (``NystromOps``): ``triton_TAG(q, k, v, scale) -> (out, middle, inverse, attn_v,
  lse_v, lse_out)``, ``Program.nystrom``, the last five outputs saved state for the backward: the
  fused backward kernels of both calls and torch ops for the pinv (torch's ``pinv_backward``),
  the softmax and the segment-mean landmarks.

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

import torch
from torch import Tensor
from torch.library import wrap_triton

from attncc.lowering.lowrank import linformer

from .runtime import FULL, TABLES, acc_dtype, features, interpreted

_OPS: dict = {}
_PLAN = "(Tensor q, Tensor k, Tensor v, Tensor[] inputs) -> Tensor[]"


def tag(kernel) -> str:
    """``<spec hash[:16]>_<config digest[:8]>``: the operators' name suffix."""
    config = hashlib.sha256(json.dumps(kernel.config, sort_keys=True).encode()).hexdigest()
    return f"{kernel.spec.hash[:16]}_{config[:8]}"


def _keep_whole(mode, op, types, args, kwargs):
    """FunctionalTensorMode rule: no decomposition, the operator stays one graph node."""
    return mode.__torch_dispatch__(op, types, args, kwargs)


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


def _tensors(values) -> list:
    """The tensors among ``values``, lists flattened."""
    flat = [x for v in values for x in (v if isinstance(v, list) else [v])]
    return [x for x in flat if isinstance(x, Tensor)]


class TritonOps:
    """A forward and a backward ``triton_op`` from a subclass's ``_forward(*args) -> outputs``
    and ``_backward(*args, *outputs, *d_outputs[:GRADS]) -> [the gradient of each floating
    tensor of args, lists flattened]`` (``ARGS`` arguments; the first ``GRADS`` outputs are
    differentiable, the others saved state) and ``_forward_fake``; kept whole under the
    interpreter. ``args(q, k, v, inputs)``: the forward's arguments for a call."""

    ARGS, GRADS = 3, 1

    def __init__(self, kernel):
        self.kernel, self.program = kernel, kernel.program
        self.names = tuple(kernel.spec.inputs)
        name = f"attncc::triton_{tag(kernel)}"
        self.forward = torch.library.triton_op(name, self._forward, mutates_args=())
        self.forward.register_fake(self._forward_fake)
        self.backward = torch.library.triton_op(f"{name}_backward", self._backward,
                                                mutates_args=())
        self.backward.register_fake(self._backward_fake)
        if interpreted():
            from torch._subclasses.functional_tensor import FunctionalTensorMode

            for operator in (self.forward, self.backward):
                operator.register_torch_dispatch(FunctionalTensorMode, _keep_whole)
        self.forward.register_autograd(self._grad, setup_context=self._setup_context)

    def _backward_fake(self, *args):
        return [torch.empty_like(x) for x in _tensors(args[:self.ARGS])
                if x.is_floating_point()]

    def _setup_context(self, ctx, inputs, output):
        ctx.mark_non_differentiable(*output[self.GRADS:])
        # per argument: a list's length, None for a tensor, else (the value,)
        ctx.layout = [len(x) if isinstance(x, list) else None if isinstance(x, Tensor) else (x,)
                      for x in inputs]
        ctx.save_for_backward(*_tensors(inputs), *output)

    def _grad(self, ctx, *d_outputs):
        saved = iter(ctx.saved_tensors)
        args = [next(saved) if n is None else [next(saved) for _ in range(n)]
                if isinstance(n, int) else n[0] for n in ctx.layout]
        outputs = list(saved)
        d_outputs = [torch.zeros_like(x) if d is None else d.contiguous()
                     for x, d in zip(outputs, d_outputs[:self.GRADS], strict=False)]
        grads = iter(self.backward(*args, *outputs, *d_outputs))

        def grad(x):
            return next(grads) if isinstance(x, Tensor) and x.is_floating_point() else None

        return tuple([grad(t) for t in x] if isinstance(x, list) else grad(x) for x in args)


class FusedOps(TritonOps):
    """The plan, forward and backward operators of a fused kernel (Linformer included)."""

    ARGS, GRADS = 6, 2

    def __init__(self, kernel):
        super().__init__(kernel)
        self.block_m, self.block_n = kernel.config["block_m"], kernel.config["block_n"]
        mask = kernel.node.mask
        self.varies = mask.varies_with if mask is not None else ()
        self.rank = kernel.node.projection or 0
        #: the inputs the fused operator takes (Linformer's E, F are applied before it)
        self.kernel_names = tuple(n for n in self.names if not (self.rank and n in ("E", "F")))
        self.plan = torch.library.custom_op(f"attncc::triton_plan_{tag(kernel)}", self._plan,
                                            mutates_args=(), schema=_PLAN)
        self.plan.register_fake(self._plan_fake)

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

    def _forward(self, q: Tensor, k: Tensor, v: Tensor, inputs: list[Tensor],
                 tables: list[Tensor], scale: float) -> tuple[Tensor, Tensor, Tensor]:
        return self.program.forward(q, k, v, dict(zip(self.kernel_names, inputs, strict=True)),
                                    dict(zip(TABLES, tables, strict=True)), scale,
                                    wrap=wrap_triton)

    def _forward_fake(self, q, k, v, inputs, tables, scale):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=acc_dtype(q.dtype))
        return out, lse, lse.new_empty((2, *lse.shape))

    def _backward(self, q: Tensor, k: Tensor, v: Tensor, inputs: list[Tensor],
                  tables: list[Tensor], scale: float, out: Tensor, lse: Tensor, thr: Tensor,
                  d_out: Tensor, d_lse: Tensor) -> list[Tensor]:
        named = dict(zip(self.kernel_names, inputs, strict=True))
        dq, dk, dv, grads = self.program.backward(
            q, k, v, named, dict(zip(TABLES, tables, strict=True)), scale, out, lse, thr, d_out,
            d_lse, wrap=wrap_triton)
        return [dq, dk, dv, *(grads[n].to(x.dtype) for n, x in named.items()
                              if x.is_floating_point())]

    def args(self, q, k, v, inputs: list):
        """The forward operator's arguments for this call: the plan tables built now (from the
        call as given), Linformer's projections applied."""
        tables = self.plan(q.detach(), k.detach(), v.detach(), [x.detach() for x in inputs])
        scale, named = self.program.scale(q, k, v), dict(zip(self.names, inputs, strict=True))
        if self.rank:
            k, v = linformer(k, v, named["E"].to(k.dtype), named["F"].to(v.dtype))
        return q, k, v, [named[n] for n in self.kernel_names], tables, scale


class LinearOps(TritonOps):
    """The forward and backward operators of one linear-attention kernel."""

    GRADS = 2

    def args(self, q, k, v, inputs: list):
        """φ(q), φ(k) (the runtime's ``features``: plain torch ops, which dynamo traces) and v."""
        omega, spec = dict(zip(self.names, inputs, strict=True)).get("omega"), self.program.spec
        return features(spec, q, omega), features(spec, k, omega), v

    def _forward(self, phi_q: Tensor, phi_k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        out = self.program.linear(phi_q, phi_k, v, wrap=wrap_triton)
        return out, self.program.denominator(phi_q, phi_k)

    def _forward_fake(self, phi_q, phi_k, v):
        out = v.new_empty((*phi_q.shape[:-1], v.shape[-1]))
        return out, phi_q.new_empty(phi_q.shape[:-1], dtype=acc_dtype(phi_q.dtype))

    def _backward(self, phi_q: Tensor, phi_k: Tensor, v: Tensor, out: Tensor, den: Tensor,
                  d_out: Tensor, d_den: Tensor) -> list[Tensor]:
        grads = self.program.linear_backward(phi_q, phi_k, v, out, d_out, den, d_den,
                                             wrap=wrap_triton)
        return [g.to(x.dtype) for g, x in zip(grads, (phi_q, phi_k, v), strict=True)]


def _t(x):
    return x.transpose(-1, -2)


def pinv_backward(grad, inverse, a):
    """The gradient of ``a`` from that of ``inverse = pinv(a)`` (square ``a``): torch's
    ``pinv_backward``, so that rank-deficient ``a`` gets the same gradient as torch autograd."""
    k = _t(grad) @ inverse
    k_inv = k @ _t(inverse)
    return (-_t(inverse @ k) + k_inv - (a @ inverse) @ k_inv
            + (_t(inverse) @ inverse) @ (_t(grad) - k @ a))


class NystromOps(TritonOps):
    """The forward and backward operators of one Nyström kernel."""

    ARGS = 4

    def args(self, q, k, v, inputs: list):
        """q, k, v and the score scale (Nyström takes no spec inputs)."""
        return q, k, v, self.program.scale(q, k, v)

    def _fused_backward(self, q, k, v, scale, out, lse, d_out):
        dense = self.program.dense_tables(q.shape[2], k.shape[2], FULL, q.device)
        dq, dk, dv, _ = self.program.backward(q, k, v, {}, dense, scale, out, lse,
                                              torch.zeros_like(lse), d_out.contiguous(),
                                              wrap=wrap_triton)
        return dq, dk, dv

    def _forward(self, q: Tensor, k: Tensor, v: Tensor, scale: float
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return self.program.nystrom(q, k, v, scale, wrap=wrap_triton, grad=False)

    def _forward_fake(self, q, k, v, scale):
        b, h, n_q, _ = q.shape
        m, dv, acc = self.kernel.node.landmarks, v.shape[-1], acc_dtype(q.dtype)
        return (q.new_empty((b, h, n_q, dv)), q.new_empty((b, h, m, m)),
                q.new_empty((b, h, m, m), dtype=acc), q.new_empty((b, h, m, dv)),
                q.new_empty((b, h, m), dtype=acc), q.new_empty((b, h, n_q), dtype=acc))

    def _backward(self, q: Tensor, k: Tensor, v: Tensor, scale: float, out: Tensor,
                  middle: Tensor, inverse: Tensor, attn_v: Tensor, lse_v: Tensor,
                  lse_out: Tensor, d_out: Tensor) -> list[Tensor]:
        acc = inverse.dtype
        q_land, k_rep = self.program.landmarks(q, k)
        z = inverse.to(q.dtype) @ attn_v
        dq, dk_rep, dz = self._fused_backward(q, k_rep, z, scale, out, lse_out, d_out)
        dz = dz.to(acc)
        d_inverse = dz @ _t(attn_v.to(acc))
        d_attn_v = (_t(inverse) @ dz).to(q.dtype)
        dq_land, dk, dv = self._fused_backward(q_land, k, v, scale, attn_v, lse_v, d_attn_v)
        mid = middle.to(acc)
        d_mid = pinv_backward(d_inverse, inverse, mid)
        d_scores = scale * mid * (d_mid - (d_mid * mid).sum(-1, keepdim=True))
        dq_land = dq_land.to(acc) + d_scores @ k_rep.to(acc)
        dk_rep = dk_rep.to(acc) + _t(d_scores) @ q_land.to(acc)
        dk_land = dk_rep.unflatten(1, (k.shape[1], q.shape[1] // k.shape[1])).sum(2)
        # a landmark is the mean of its segment: each position gets 1/segment of its gradient
        m = self.kernel.node.landmarks
        seg_q, seg_k = q.shape[2] // m, k.shape[2] // m
        dq = dq.to(acc) + (dq_land / seg_q).repeat_interleave(seg_q, dim=2)
        dk = dk.to(acc) + (dk_land / seg_k).repeat_interleave(seg_k, dim=2)
        return [dq.to(q.dtype), dk.to(k.dtype), dv]
