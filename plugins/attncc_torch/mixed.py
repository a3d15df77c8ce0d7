"""Half-type products with float32 results: how the torch kernel computes half types on CUDA.

Where the device has fast half matmuls (``MIXED_DEVICES``: CUDA), float16 and bfloat16 calls keep
q, k and v in their own dtype instead of upcasting them: every product of the tile loop and of
the dense decoding pass takes half operands and returns float32 (``Mixed``), while the scores
after the product, score_mod, mask, the softmax states, the accumulators and the gradient sums
stay float32 (FlashAttention's recipe). Elsewhere half types compute in float32
(``attncc.lowering.prologue``).
"""

from __future__ import annotations

import functools

import torch

#: Device types whose float16/bfloat16 calls compute mixed (a test adds "cpu").
MIXED_DEVICES = {"cuda"}
HALF = (torch.float16, torch.bfloat16)


class Mixed:
    """``mm(a, b)``: ``a @ b`` (broadcasting batch axes) from operands cast to ``half``, the
    result float32: the exact products of the half operands summed in float32 where the device
    has a float32-output product, else the half product upcast. Differentiable: where autograd
    records the call it is the same product through plain ops (a backward that recomputes
    scores then sees what the forward saw)."""

    def __init__(self, half, device):
        self.half = half
        self.acc = torch.float32
        self._wide = _has_out_dtype(str(device), half)

    @classmethod
    def of(cls, x) -> Mixed | None:
        """The policy for tensor ``x``: a ``Mixed`` where ``x`` is a half type on one of
        ``MIXED_DEVICES``, else None (compute in the prologue's dtype)."""
        if isinstance(x, torch.Tensor) and x.dtype in HALF and x.device.type in MIXED_DEVICES:
            return cls(x.dtype, x.device)
        return None

    def __call__(self, a, b):
        a, b = a.to(self.half), b.to(self.half)
        if not self._wide:
            return (a @ b).to(self.acc)
        if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
            return a.to(self.acc) @ b.to(self.acc)
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        a3 = a.expand(*batch, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
        b3 = b.expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
        out = torch.bmm(a3, b3, out_dtype=self.acc)
        return out.view(*batch, a.shape[-2], b.shape[-1])


@functools.cache
def _has_out_dtype(device: str, half) -> bool:
    """Whether ``torch.bmm`` takes ``out_dtype=float32`` for ``half`` operands on ``device``
    (CUDA builds; not the CPU)."""
    try:
        x = torch.ones(1, 1, 1, dtype=half, device=device)
        return torch.bmm(x, x, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, NotImplementedError, TypeError):
        return False
