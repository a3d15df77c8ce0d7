"""Nyström attention on the Triton backend as ``torch.library.triton_op``s (see ``triton_ops``).

The lowering is ``out = softmax(s q k̃ᵀ) · pinv(softmax(s q̃ k̃ᵀ)) · softmax(s q̃ kᵀ) v`` with
segment-mean landmarks q̃, k̃: the two outer products are the dense fused kernel (no mask, so
every block of its plan is FULL and the tables are built by torch ops), the rest torch ops.

- ``attncc::triton_TAG(q, k, v, scale) -> (out, middle, inverse, attn_v, lse_v, lse_out)``:
  ``middle = softmax(s q̃ k̃ᵀ)``, ``inverse`` its pinv (accumulation dtype), ``attn_v`` the
  first fused call's output and the two fused calls' log-sum-exps, saved for the backward and
  not differentiable.
- ``attncc::triton_TAG_backward(q, k, v, scale, <those five>, d_out) -> [dq, dk, dv]``: the
  fused backward kernels of both calls, and torch ops for the pinv (torch's own formula,
  ``pinv_backward``), the softmax and the landmark means.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attncc.integrations.triton_ops import TABLES, acc_dtype, define, scale_of, tag

__all__ = ["NystromOps"]


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
        self.kernel, self.module = kernel, kernel.module
        self.landmarks = self.module.SPEC["landmarks"]
        self.forward, self.backward = define(
            f"triton_{tag(kernel)}", self._forward, self._forward_fake, self._backward,
            self._backward_fake, self._grad, self._setup_context)

    # pieces ------------------------------------------------------------------------------------
    def _landmarks(self, q, k):
        """Segment means q̃ (B, H, m, D) and k̃ repeated to the query heads (B, H, m, D)."""
        m, group = self.landmarks, q.shape[1] // k.shape[1]
        q_land = q.unflatten(2, (m, q.shape[2] // m)).mean(3)
        k_land = k.unflatten(2, (m, k.shape[2] // m)).mean(3)
        return q_land, k_land.repeat_interleave(group, dim=1)

    def _tables(self, q, k) -> dict:
        config = self.module.CONFIG
        shape = (1, 1, -(-q.shape[2] // config["block_m"]), -(-k.shape[2] // config["block_n"]))
        full = torch.full(shape, 2, dtype=torch.int8, device=q.device)
        tables = self.module.tables_from_states(full, padded=True)
        return {n: tables[n] for n in TABLES}

    def _fused(self, q, k, v, scale):
        m = self.module
        return m.launch_forward(m._KERNELS, m.SPEC, m.CONFIG, q, k, v, {}, self._tables(q, k),
                                scale, wrap=torch.library.wrap_triton)

    def _fused_backward(self, q, k, v, scale, out, lse, d_out):
        m = self.module
        dq, dk, dv, _ = m.launch_backward(
            m._KERNELS, m.SPEC, m.CONFIG, q, k, v, {}, self._tables(q, k), scale, out, lse,
            torch.zeros_like(lse), d_out.contiguous(), None, wrap=torch.library.wrap_triton)
        return dq, dk, dv

    # forward -----------------------------------------------------------------------------------
    def _forward(self, q: Tensor, k: Tensor, v: Tensor, scale: float
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        q_land, k_rep = self._landmarks(q, k)
        middle = torch.softmax(scale * (q_land @ _t(k_rep)), -1)
        inverse = torch.linalg.pinv(middle.to(acc_dtype(q.dtype)))
        attn_v, lse_v, _ = self._fused(q_land, k, v, scale)
        out, lse_out, _ = self._fused(q, k_rep, inverse.to(q.dtype) @ attn_v, scale)
        return out, middle, inverse, attn_v, lse_v, lse_out

    def _forward_fake(self, q, k, v, scale):
        b, h, n_q, _ = q.shape
        m, dv, acc = self.landmarks, v.shape[-1], acc_dtype(q.dtype)
        return (q.new_empty((b, h, n_q, dv)), q.new_empty((b, h, m, m)),
                q.new_empty((b, h, m, m), dtype=acc), q.new_empty((b, h, m, dv)),
                q.new_empty((b, h, m), dtype=acc), q.new_empty((b, h, n_q), dtype=acc))

    # backward ----------------------------------------------------------------------------------
    def _backward(self, q: Tensor, k: Tensor, v: Tensor, scale: float, out: Tensor,
                  middle: Tensor, inverse: Tensor, attn_v: Tensor, lse_v: Tensor,
                  lse_out: Tensor, d_out: Tensor) -> list[Tensor]:
        acc = inverse.dtype
        q_land, k_rep = self._landmarks(q, k)
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
        return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)]

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

    # the call ----------------------------------------------------------------------------------
    def args(self, q, k, v, inputs: list):
        """The forward operator's arguments for this call (Nyström takes no spec inputs)."""
        return q, k, v, scale_of(self.module, q, k, v)

    def __call__(self, q, k, v, inputs: list):
        return self.forward(*self.args(q, k, v, inputs))[0]
