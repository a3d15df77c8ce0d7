"""Linear attention on the Triton backend as ``torch.library.triton_op``s (see ``triton_ops``).

- ``attncc::triton_TAG(q, k, v, inputs) -> (out, den)``: the feature maps φ(q), φ(k) (torch
  ops), one ``wrap_triton`` launch of the chunked ``_linear`` kernel, and ``den`` (B, H, Nq),
  the row sums ``Σ_j φq_i·φk_j`` the kernel divides by (torch ops, in the accumulation dtype),
  which the backward needs.
- ``attncc::triton_TAG_backward(q, k, v, inputs, out, den, d_out, d_den) -> Tensor[]``: the
  gradients of ``num = out * den`` and ``den`` (torch ops), one launch of ``_linear_bwd`` for
  dφ(q), dφ(k), dv, and the feature maps' vector-Jacobian products (torch ops; performer's gives
  the gradient of ``omega`` too). Returns dq, dk, dv and one gradient per floating input.

The forward's ``register_autograd`` calls the backward operator, so gradients never go through
torch autograd of the kernel's body.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attncc.integrations.triton_ops import acc_dtype, define, per_input, tag

__all__ = ["LinearOps"]


class LinearOps:
    """The forward and backward ``triton_op``s of one linear-attention Triton kernel."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.names = tuple(kernel.spec.inputs)
        self.forward, self.backward = define(
            f"triton_{tag(kernel)}", self._forward, self._forward_fake, self._backward,
            self._backward_fake, self._grad, self._setup_context)

    def _features(self, q, k, inputs):
        omega = dict(zip(self.names, inputs, strict=True)).get("omega")
        return omega, self.kernel.features(q, omega), self.kernel.features(k, omega)

    # forward -----------------------------------------------------------------------------------
    def _forward(self, q: Tensor, k: Tensor, v: Tensor,
                 inputs: list[Tensor]) -> tuple[Tensor, Tensor]:
        _, phi_q, phi_k = self._features(q, k, inputs)
        out = self.kernel.linear_forward(phi_q, phi_k, v, wrap=torch.library.wrap_triton)
        return out, self.kernel.denominator(phi_q, phi_k)

    def _forward_fake(self, q, k, v, inputs):
        out = v.new_empty((*q.shape[:-1], v.shape[-1]))
        return out, q.new_empty(q.shape[:-1], dtype=acc_dtype(q.dtype))

    # backward ----------------------------------------------------------------------------------
    def _backward(self, q: Tensor, k: Tensor, v: Tensor, inputs: list[Tensor], out: Tensor,
                  den: Tensor, d_out: Tensor, d_den: Tensor) -> list[Tensor]:
        omega, phi_q, phi_k = self._features(q, k, inputs)
        acc = den.dtype
        # out = num / den where den != 0, else 0 (and then no gradient reaches num)
        empty = den == 0
        safe = torch.where(empty, torch.ones_like(den), den)
        d_out = d_out.to(acc)
        d_num = torch.where(empty[..., None], torch.zeros_like(d_out), d_out / safe[..., None])
        through = torch.where(empty, torch.zeros_like(den), (d_out * out.to(acc)).sum(-1) / safe)
        d_den = d_den.to(acc) - through
        d_pq, d_pk, dv = self.kernel.linear_backward(phi_q, phi_k, v, d_num, d_den,
                                                     wrap=torch.library.wrap_triton)
        dq, d_omega_q = self.kernel.features_vjp(q, omega, d_pq)
        dk, d_omega_k = self.kernel.features_vjp(k, omega, d_pk)
        floats = []
        for name, x in zip(self.names, inputs, strict=True):
            if x.is_floating_point():
                grad = d_omega_q + d_omega_k if name == "omega" else torch.zeros_like(x)
                floats.append(grad.to(x.dtype))
        return [dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *floats]

    def _backward_fake(self, q, k, v, inputs, out, den, d_out, d_den):
        return [torch.empty_like(x) for x in (q, k, v, *(x for x in inputs
                                                         if x.is_floating_point()))]

    def _setup_context(self, ctx, inputs, output):
        q, k, v, tensors = inputs
        out, den = output
        ctx.n_inputs = len(tensors)
        ctx.save_for_backward(q, k, v, out, den, *tensors)

    def _grad(self, ctx, d_out, d_den):
        q, k, v, out, den, *tensors = ctx.saved_tensors
        d_out = torch.zeros_like(out) if d_out is None else d_out
        d_den = torch.zeros_like(den) if d_den is None else d_den
        grads = self.backward(q, k, v, list(tensors), out, den, d_out.contiguous(),
                              d_den.contiguous())
        return (*grads[:3], per_input(tensors, grads[3:]))

    # the call ----------------------------------------------------------------------------------
    def args(self, q, k, v, inputs: list):
        """The forward operator's arguments for this call."""
        return q, k, v, list(inputs)

    def __call__(self, q, k, v, inputs: list):
        return self.forward(*self.args(q, k, v, inputs))[0]
