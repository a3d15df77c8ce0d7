"""``Kernel.backward`` for kernels whose forward is differentiable by torch autograd."""

from __future__ import annotations


def autograd_backward(kernel, q, k, v, grad_out, **inputs) -> dict:
    """Gradients of ``sum(kernel(q, k, v, **inputs) * grad_out)``.

    Returns ``{"q", "k", "v", and every floating tensor input's name: gradient}``; an input the
    output does not depend on gets zeros. The arguments are not modified.
    """
    import torch

    leaves = {"q": q, "k": k, "v": v,
              **{n: x for n, x in inputs.items()
                 if isinstance(x, torch.Tensor) and x.is_floating_point()}}
    leaves = {n: x.detach().requires_grad_() for n, x in leaves.items()}
    args = {**inputs, **{n: leaves[n] for n in leaves if n not in ("q", "k", "v")}}
    with torch.enable_grad():
        out = kernel(leaves["q"], leaves["k"], leaves["v"], **args)
        grads = torch.autograd.grad(out, list(leaves.values()), grad_out, allow_unused=True)
    return {n: (torch.zeros_like(x) if g is None else g)
            for (n, x), g in zip(leaves.items(), grads, strict=True)}
