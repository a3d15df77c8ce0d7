"""Linear attention and Nyström as ``torch.library.triton_op``s (registered as in ``ops``).

Linear attention (``LinearOps``):

- ``attncc::triton_TAG(q, k, v, inputs) -> (out, den)``: the feature maps φ(q), φ(k)
  (``attncc.lowering.features``, torch ops), one ``wrap_triton`` launch of the chunked
  ``_linear`` kernel, and ``den`` (B, H, Nq), the row sums ``Σ_j φq_i·φk_j`` the kernel divides
  by, which the backward needs;
- ``attncc::triton_TAG_backward(q, k, v, inputs, out, den, d_out, d_den) -> Tensor[]``: the
  gradients of ``num`` and ``den`` (``divide_vjp``), one launch of ``_linear_bwd`` for dφ(q),
  dφ(k), dv, and the feature maps' vector-Jacobian products (performer's gives omega's too).

Nyström (``NystromOps``), ``out = softmax(s q k̃ᵀ) · pinv(softmax(s q̃ k̃ᵀ)) · softmax(s q̃ kᵀ) v``
with segment-mean landmarks q̃, k̃: the two outer products are the dense fused kernel (every
block FULL), the rest torch ops.

- ``attncc::triton_TAG(q, k, v, scale) -> (out, middle, inverse, attn_v, lse_v, lse_out)``:
  ``middle = softmax(s q̃ k̃ᵀ)``, ``inverse`` its pinv (accumulation dtype), ``attn_v`` the first
  fused call's output and both calls' log-sum-exps, saved for the backward;
- ``attncc::triton_TAG_backward(q, k, v, scale, <those five>, d_out) -> [dq, dk, dv]``: the fused
  backward kernels of both calls, and torch ops for the pinv (torch's ``pinv_backward``), the
  softmax and the landmark means.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attncc.lowering.features import divide_vjp, feature_map, feature_map_vjp

from .ops import define, floating_like, per_input, tag
from .runtime import FULL, acc_dtype


class LinearOps:
    """The forward and backward ``triton_op``s of one linear-attention Triton kernel."""

    def __init__(self, kernel):
        self.program, self.kind = kernel.program, kernel.node.feature_map
        self.names = tuple(kernel.spec.inputs)
        self.forward, self.backward = define(self, f"triton_{tag(kernel)}")

    def _features(self, q, k, inputs):
        omega = dict(zip(self.names, inputs, strict=True)).get("omega")
        return omega, feature_map(self.kind, q, omega), feature_map(self.kind, k, omega)

    def _forward(self, q: Tensor, k: Tensor, v: Tensor,
                 inputs: list[Tensor]) -> tuple[Tensor, Tensor]:
        _, phi_q, phi_k = self._features(q, k, inputs)
        out = self.program.linear(phi_q, phi_k, v, wrap=torch.library.wrap_triton)
        return out, self.program.denominator(phi_q, phi_k)

    def _forward_fake(self, q, k, v, inputs):
        out = v.new_empty((*q.shape[:-1], v.shape[-1]))
        return out, q.new_empty(q.shape[:-1], dtype=acc_dtype(q.dtype))

    def _backward(self, q: Tensor, k: Tensor, v: Tensor, inputs: list[Tensor], out: Tensor,
                  den: Tensor, d_out: Tensor, d_den: Tensor) -> list[Tensor]:
        omega, phi_q, phi_k = self._features(q, k, inputs)
        d_num, d_through = divide_vjp(out, den, d_out)
        d_pq, d_pk, dv = self.program.linear_backward(phi_q, phi_k, v, d_num,
                                                      d_den.to(den.dtype) + d_through,
                                                      wrap=torch.library.wrap_triton)
        dq, d_omega_q = feature_map_vjp(self.kind, q, omega, d_pq)
        dk, d_omega_k = feature_map_vjp(self.kind, k, omega, d_pk)
        floats = []
        for name, x in zip(self.names, inputs, strict=True):
            if x.is_floating_point():
                grad = d_omega_q + d_omega_k if name == "omega" else torch.zeros_like(x)
                floats.append(grad.to(x.dtype))
        return [dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *floats]

    def _backward_fake(self, q, k, v, inputs, out, den, d_out, d_den):
        return floating_like((q, k, v, *inputs))

    def _setup_context(self, ctx, inputs, output):
        q, k, v, tensors = inputs
        ctx.n_inputs = len(tensors)
        ctx.save_for_backward(q, k, v, *output, *tensors)

    def _grad(self, ctx, d_out, d_den):
        q, k, v, out, den, *tensors = ctx.saved_tensors
        d_out = torch.zeros_like(out) if d_out is None else d_out
        d_den = torch.zeros_like(den) if d_den is None else d_den
        grads = self.backward(q, k, v, list(tensors), out, den, d_out.contiguous(),
                              d_den.contiguous())
        return (*grads[:3], per_input(tensors, grads[3:]))

    def args(self, q, k, v, inputs: list):
        """The forward operator's arguments for this call."""
        return q, k, v, list(inputs)


def _t(x):
    return x.transpose(-1, -2)


def pinv_backward(grad, inverse, a):
    """The gradient of ``a`` from that of ``inverse = pinv(a)`` (square ``a``): torch's
    ``pinv_backward``, so that rank-deficient ``a`` gets the same gradient as torch autograd."""
    k = _t(grad) @ inverse
    k_inv = k @ _t(inverse)
    return (-_t(inverse @ k) + k_inv - (a @ inverse) @ k_inv
            + (_t(inverse) @ inverse) @ (_t(grad) - k @ a))


class NystromOps:
    """The forward and backward ``triton_op``s of one Nyström Triton kernel."""

    def __init__(self, kernel):
        self.program, self.landmarks = kernel.program, kernel.node.landmarks
        self.forward, self.backward = define(self, f"triton_{tag(kernel)}")

    def _tables(self, q, k) -> dict:
        return self.program.dense_tables(q.shape[2], k.shape[2], FULL, q.device)

    def _fused_backward(self, q, k, v, scale, out, lse, d_out):
        dq, dk, dv, _ = self.program.backward(q, k, v, {}, self._tables(q, k), scale, out, lse,
                                              torch.zeros_like(lse), d_out.contiguous(),
                                              wrap=torch.library.wrap_triton)
        return dq, dk, dv

    def _forward(self, q: Tensor, k: Tensor, v: Tensor, scale: float
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return self.program.nystrom(q, k, v, scale, wrap=torch.library.wrap_triton, grad=False)

    def _forward_fake(self, q, k, v, scale):
        b, h, n_q, _ = q.shape
        m, dv, acc = self.landmarks, v.shape[-1], acc_dtype(q.dtype)
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
        seg_q, seg_k = q.shape[2] // self.landmarks, k.shape[2] // self.landmarks
        dq = dq.to(acc) + (dq_land / seg_q).repeat_interleave(seg_q, dim=2)
        dk = dk.to(acc) + (dk_land / seg_k).repeat_interleave(seg_k, dim=2)
        return [dq.to(q.dtype), dk.to(k.dtype), dv]

    def _backward_fake(self, q, k, v, scale, out, middle, inverse, attn_v, lse_v, lse_out,
                       d_out):
        return floating_like((q, k, v))

    def _setup_context(self, ctx, inputs, output):
        q, k, v, scale = inputs
        ctx.scale = scale
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(q, k, v, *output)

    def _grad(self, ctx, d_out, *_):
        q, k, v, out, *saved = ctx.saved_tensors
        d_out = torch.zeros_like(out) if d_out is None else d_out
        dq, dk, dv = self.backward(q, k, v, ctx.scale, out, *saved, d_out.contiguous())
        return dq, dk, dv, None

    def args(self, q, k, v, inputs: list):
        """The forward operator's arguments for this call (Nyström takes no spec inputs)."""
        return q, k, v, self.program.scale(q, k, v)
