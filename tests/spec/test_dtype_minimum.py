"""Additive padding biases at each dtype's minimum (transformers' convention: -3.4e38 in float32)
on every backend and normalization, checked against plain float64 torch (not attncc.reference).

The Triton part runs under TRITON_INTERPRET=1 on tiny sizes."""

from __future__ import annotations

import math
import os

import pytest
import torch

import attncc

B, H, HKV, NQ, NK, D = 2, 4, 2, 7, 13, 8


def normalized(s, normalize, topk):
    """Plain torch float64 weights of scores ``s`` under ``normalize`` (top-k: ties kept)."""
    if normalize == "sigmoid":
        return torch.sigmoid(s)
    keep = s >= s.detach().topk(topk, -1).values[..., -1:] if normalize == "topk" else s == s
    m = torch.where(keep, s, -math.inf).amax(-1, keepdim=True).detach()
    p = torch.where(keep, torch.exp(s - m), torch.zeros_like(s))
    return p / p.sum(-1, keepdim=True)


@pytest.mark.parametrize("normalize", ["softmax", "topk", "sigmoid"])
@pytest.mark.parametrize("backend, dtype", [
    *((b, d) for b in ("numpy", "torch", "triton") for d in ("float64", "float32")),
    ("torch", "float16"), ("torch", "bfloat16"), ("triton", "float16")])
def test_padding_at_the_dtype_minimum(backend, dtype, normalize):
    """An additive padding bias at the dtype's minimum (transformers' convention) on every key of
    batch 1 and on the last keys of batch 0: outputs and the q, k, v and bias gradients match
    plain float64 torch, fully masked rows (uniform weights, as in float64) included; top-k with K
    past the unpadded keys keeps the tied padded keys at the threshold. (Triton's bfloat16 is not
    checked: its interpreter multiplies bfloat16 dots' bit patterns.)"""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton needs TRITON_INTERPRET=1 here")
    tdtype, topk = getattr(torch, dtype), 11
    spec = attncc.load_spec({"attncc": 1, "name": "pad", "heads": H, "kv_heads": HKV,
                             "head_dim": D, "score_mod": "score + pad[b, kv_idx]",
                             "normalize": normalize, **({"topk": topk} if normalize == "topk"
                                                        else {}),
                             "inputs": {"pad": {"shape": ["batch", "seq_k"]}}})
    g = torch.Generator().manual_seed(7)
    leaves = [torch.randn(B, n, s, D, generator=g, dtype=torch.float64).requires_grad_()
              for n, s in ((H, NQ), (HKV, NK), (HKV, NK))]
    pad = torch.zeros(B, NK, dtype=torch.float64)
    pad[0, 9:] = pad[1, :] = torch.finfo(tdtype).min
    leaves.append(pad.requires_grad_())
    q, k, v = (x.repeat_interleave(H // HKV, dim=1) if x.shape[1] == HKV else x
               for x in leaves[:3])
    ref = normalized(q @ k.transpose(-1, -2) / math.sqrt(D) + pad[:, None, None, :],
                     normalize, topk) @ v
    kernel = attncc.compile(spec, backend=backend, dtype=dtype)
    args = [x.detach().to(tdtype).requires_grad_() for x in leaves]
    tol = {"float64": 1e-12, "float32": 2e-6, "float16": 5e-3, "bfloat16": 4e-2}[dtype]
    if backend == "numpy":
        out = kernel(*(x.detach().numpy() for x in args[:3]), pad=args[3].detach().numpy())
        torch.testing.assert_close(torch.from_numpy(out).double(), ref.detach(), atol=tol,
                                   rtol=tol)
        return
    out = kernel(*args[:3], pad=args[3])
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    d_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = torch.autograd.grad(out, args, d_out.to(tdtype))
    for a, w in zip(got, torch.autograd.grad(ref, leaves, d_out), strict=True):
        torch.testing.assert_close(a.double(), w, atol=tol * 10, rtol=tol * 10)
