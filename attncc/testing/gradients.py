"""Gradient checks for kernels with a backward: the rule of ``accuracy`` applied to gradients.

The kernel's gradients of q, k, v and of every floating input (for a random output gradient) are
compared with autograd through ``attncc.reference.attend`` on float64 torch tensors, with the same
computation in the kernel's dtype as the eager yardstick (in float32, its error scaled by
``FLOAT64_FROM_FLOAT32``, for a float64 kernel: see ``accuracy``). The floor of every gradient is
relative to the largest reference gradient of the call.
"""

from __future__ import annotations

from attncc.reference import attend
from attncc.testing.accuracy import (
    FLOAT64_FROM_FLOAT32,
    Check,
    eager_attend,
    judge,
    magnitude,
)


def gradient_checks(kernel, spec, q, k, v, inputs: dict, dtype: str, seed: int) -> list[Check]:
    """One Check per differentiable tensor: ``grad q``, ``grad k``, ``grad v``, ``grad <input>``."""
    import torch

    if not isinstance(q, torch.Tensor):
        raise AssertionError(f"gradient checks need torch tensors, got {type(q).__name__}")
    names = ["q", "k", "v", *(n for n in inputs if spec.inputs[n].is_float)]
    given = {"q": q, "k": k, "v": v, **inputs}
    out_shape = (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    gen = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(out_shape, generator=gen, dtype=torch.float64)

    def run(fn, cast):
        leaves = {n: (cast(x).detach().clone().requires_grad_(True) if n in names
                      else x) for n, x in given.items()}
        ins = {n: leaves[n] for n in inputs}
        out = fn(leaves["q"], leaves["k"], leaves["v"], ins)
        out.backward(grad_out.to(device=out.device, dtype=out.dtype))
        return {n: (leaves[n].grad if leaves[n].grad is not None
                    else torch.zeros_like(leaves[n])) for n in names}

    same = lambda x: x  # noqa: E731 - the identity cast
    got = run(lambda q_, k_, v_, ins: kernel(q_, k_, v_, **ins), same)
    ref = run(lambda q_, k_, v_, ins: attend(spec, q_, k_, v_, ins), lambda x: x.double())
    if dtype == "float64":
        eager_dtype, factor = "float32", FLOAT64_FROM_FLOAT32
        eager = run(lambda q_, k_, v_, ins: attend(spec, q_, k_, v_, ins), lambda x: x.float())
    else:
        eager_dtype, factor = dtype, 1.0
        eager = run(lambda q_, k_, v_, ins: eager_attend(spec, q_, k_, v_, ins, False)[0], same)
    # a gradient that is exactly zero (hard attention's dq, dk) is still computed from terms as
    # large as the other gradients, so the floor is relative to the largest of them
    scale = max(magnitude(ref[n]) for n in names)
    return [judge(f"grad {n}", got[n], eager[n], ref[n], dtype, scale, eager_dtype=eager_dtype,
                  eager_factor=factor) for n in names]
