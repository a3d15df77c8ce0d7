"""The FlexAttention catalogue in the spec language 1.1: each pattern as a spec, every backend's
forward and backward checked against an independent dense float64 implementation of the mod in
plain torch (not attncc.reference), with ragged sizes, seq_q != seq_k and grouped heads.

The Triton part runs under TRITON_INTERPRET=1 on tiny sizes (marked ``triton``)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attncc

B, H, HKV, NQ, NK, D = 2, 4, 2, 7, 13, 8
F32_MIN = float(np.finfo(np.float32).min)


def ix():
    """b, h, q_idx, kv_idx as broadcasting int64 tensors of the (B, H, NQ, NK) score layout."""
    return (torch.arange(B).view(B, 1, 1, 1), torch.arange(H).view(1, H, 1, 1),
            torch.arange(NQ).view(1, 1, NQ, 1), torch.arange(NK).view(1, 1, 1, NK))


def pad_inputs(g):
    pad = torch.zeros(B, NK, dtype=torch.float64)
    pad[0, 9:] = F32_MIN
    pad[1, :] = F32_MIN  # every key of batch 1 padded: its rows are fully masked
    return {"pad": pad}


def t5_inputs(g):
    return {"rel": torch.randn(H, 8, generator=g, dtype=torch.float64),
            "rel2": torch.randn(H, NQ + NK, generator=g, dtype=torch.float64)}


def bias_inputs(g):
    return {"temp": torch.tensor(0.7, dtype=torch.float64),
            "bias": torch.randn(H, NQ, generator=g, dtype=torch.float64)}


def softcap(s, b, h, q, kv, x):
    fn = torch.nn.functional
    return (torch.clamp(s, -1, 1) + 0.1 * fn.silu(s)
            + 0.1 * fn.gelu(s) + 0.1 * fn.gelu(s, approximate="tanh")
            + 0.1 * torch.erf(s) + 0.1 * torch.sin(s) * torch.cos(q.double())
            + 0.05 * torch.tan(kv.double() / 100) + 0.1 * torch.sign((q - kv).double())
            + 0.01 * torch.round(q.double() / 3) + 0.1 * 2.0 ** (-s * s)
            + 0.1 * torch.log2(1 + s * s))


def t5(s, b, h, q, kv, x):
    d = (q - kv).abs().clamp(min=1).double()
    bucket = torch.clamp(torch.floor(torch.log2(d)), max=7).long()
    hh = h.expand(1, H, NQ, NK)
    middle = ((q + kv) // 2).expand(1, H, NQ, NK)
    return s + x["rel"][hh, bucket.expand(1, H, NQ, NK)] + x["rel2"][hh, middle]


#: name -> (spec keys, mod(s, b, h, q, kv, inputs) or None, mask(b, h, q, kv) or None, inputs)
CATALOGUE = {
    "neg_inf_where": ({"score_mod": "where(kv_idx <= q_idx + seq_k - seq_q - 8, score, -inf)"},
                      None, lambda b, h, q, kv: kv <= q + NK - NQ - 8, None),
    "neg_inf_on_score": ({"score_mod": "where(score > 0.3, score, -inf)"},
                         lambda s, *_: torch.where(s > 0.3, s, -math.inf), None, None),
    "score_minus_inf": ({"score_mod": "score - inf if q_idx < 2 else score"},
                        None, lambda b, h, q, kv: q >= 2, None),
    "alibi_formula": ({"score_mod": "score - 2 ** (-8 * (h + 1) / heads) * (q_idx - kv_idx)",
                       "mask": "kv_idx <= q_idx + seq_k - seq_q"},
                      lambda s, b, h, q, kv, x: s - 2.0 ** (-8 * (h + 1) / H) * (q - kv),
                      lambda b, h, q, kv: kv <= q + NK - NQ, None),
    "functions": ({"score_mod": "clamp(score, -1, 1) + 0.1 * silu(score) + 0.1 * gelu(score) + "
                                "0.1 * gelu_tanh(score) + 0.1 * erf(score) + 0.1 * sin(score) * "
                                "cos(q_idx) + 0.05 * tan(kv_idx / 100) + 0.1 * sign(q_idx - "
                                "kv_idx) + 0.01 * round(q_idx / 3) + 0.1 * exp2(-score * score) "
                                "+ 0.1 * log2(1 + score * score)"}, softcap, None, None),
    "bit_ops": ({"mask": "(q_idx & 3) == (kv_idx & 3) or (q_idx >> 2) == (kv_idx >> 2) or "
                         "((q_idx ^ kv_idx) < 2) != (h == 1) or (kv_idx | 1) << 1 == 6"}, None,
                lambda b, h, q, kv: ((q & 3) == (kv & 3)) | ((q >> 2) == (kv >> 2))
                | (((q ^ kv) < 2) != (h == 1)) | (((kv | 1) << 1) == 6), None),
    "conditions_equal": ({"mask": "(q_idx >= 3) == (kv_idx >= 6)"}, None,
                         lambda b, h, q, kv: (q >= 3) == (kv >= 6), None),
    "scalar_and_chained": ({"score_mod": "score * temp + bias[h][q_idx]",
                            "inputs": {"temp": {"shape": []},
                                       "bias": {"shape": ["heads", "seq_q"]}}},
                           lambda s, b, h, q, kv, x: s * x["temp"] + x["bias"][h, q], None,
                           bias_inputs),
    "t5_buckets": ({"score_mod": "score + rel[h, min(floor(log2(max(abs(q_idx - kv_idx), 1))), "
                                 "7)] + rel2[h, (q_idx + kv_idx) / 2]",
                    "inputs": {"rel": {"shape": ["heads", 8]},
                               "rel2": {"shape": ["heads", "seq_q + seq_k"]}}}, t5, None,
                   t5_inputs),
    "padding_at_float32_min": ({"score_mod": "score + pad[b, kv_idx]",
                                "inputs": {"pad": {"shape": ["batch", "seq_k"]}}},
                               lambda s, b, h, q, kv, x: s + x["pad"][b, kv], None, pad_inputs),
}


ROPE = {"attncc": 1, "name": "latent_rope_term", "heads": H, "kv_heads": HKV, "head_dim": D,
        "score_mod": "score + 0.5 * sum(qr[b, h, q_idx, d] * kr[b, h // 2, kv_idx, d] "
                     "for d in range(4))",
        "inputs": {"qr": {"shape": ["batch", "heads", "seq_q", 4]},
                   "kr": {"shape": ["batch", "kv_heads", "seq_k", 4]}}}


def rope_inputs(g):
    return {"qr": torch.randn(B, H, NQ, 4, generator=g, dtype=torch.float64),
            "kr": torch.randn(B, HKV, NK, 4, generator=g, dtype=torch.float64)}


def rope(s, b, h, q, kv, x):
    return s + 0.5 * x["qr"] @ x["kr"].repeat_interleave(H // HKV, dim=1).transpose(-1, -2)


def distance_inputs(g):
    return {"w": torch.randn(H, 4, generator=g, dtype=torch.float64)}


def distance(s, b, h, q, kv, x):
    dist = (q - kv).abs().double()
    return s - sum(x["w"][:, d].view(1, H, 1, 1) * torch.exp(-dist / 2 ** d) for d in range(4))


def kinks(s, *_):
    return (torch.maximum(s, torch.tensor(-0.2, dtype=s.dtype)) + 0.5 * torch.clamp(s, -0.5, 0.5)
            + torch.minimum(s, torch.tensor(0.3, dtype=s.dtype)) + 0.1 * torch.sign(s)
            + 0.1 * torch.floor(3 * s) + 0.1 * torch.ceil(2 * s) + 0.1 * torch.round(3 * s)
            + torch.remainder(s, 0.5) + (s - 0.1).abs() + 0.1 * torch.floor(s.abs()))


#: derivatives sympy leaves as Heaviside, DiracDelta, Subs of d floor, ... (0 or 1 off the kinks)
CATALOGUE["kinks"] = ({"score_mod": "max(score, -0.2) + 0.5 * clamp(score, -0.5, 0.5) + "
                                    "min(score, 0.3) + 0.1 * sign(score) + 0.1 * floor(3 * score)"
                                    " + 0.1 * ceil(2 * score) + 0.1 * round(3 * score) + "
                                    "score % 0.5 + abs(score - 0.1) + 0.1 * floor(abs(score))"},
                      kinks, None, None)
CATALOGUE["latent_rope_reduction"] = ({k: ROPE[k] for k in ("score_mod", "inputs")}, rope,
                                      None, rope_inputs)
CATALOGUE["latent_rope_dot"] = ({"score_mod": "score + 0.5 * dot(qr[b, h, q_idx], "
                                              "kr[b, h // 2, kv_idx])",
                                 "inputs": ROPE["inputs"]}, rope, None, rope_inputs)
CATALOGUE["distance_bias_sum"] = ({"score_mod": "score - sum(w[h, d] * exp(-abs(q_idx - kv_idx)"
                                                " / 2 ** d) for d in range(4))",
                                   "inputs": {"w": {"shape": ["heads", 4]}}}, distance, None,
                                  distance_inputs)


def dense(q, k, v, mod, mask, inputs):
    """Softmax attention in plain torch float64: a pair is dropped by the mask or a -inf score;
    a row with none left gives 0."""
    k, v = (x.repeat_interleave(H // HKV, dim=1) for x in (k, v))
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    b, h, qi, kv = ix()
    if mod is not None:
        s = mod(s, b, h, qi, kv, inputs)
    keep = s > -math.inf
    if mask is not None:
        keep = keep & mask(b, h, qi, kv)
    m = torch.where(keep, s, -math.inf).amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.where(keep, torch.exp(torch.where(keep, s, m) - m), torch.zeros_like(s))
    total = p.sum(-1, keepdim=True)
    return (p / torch.where(total > 0, total, torch.ones_like(total))) @ v


def problem(name, dtype):
    keys, mod, mask, make = CATALOGUE[name]
    spec = attncc.load_spec({"attncc": 1, "name": name, "heads": H, "kv_heads": HKV,
                             "head_dim": D, **keys})
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(B, n, s, D, generator=g, dtype=torch.float64)
               for n, s in ((H, NQ), (HKV, NK), (HKV, NK)))
    inputs = make(g) if make else {}
    return spec, (q, k, v), inputs, mod, mask, dtype


def check(name, backend, dtype, grads):
    spec, qkv, inputs, mod, mask, dtype = problem(name, dtype)
    tdtype = getattr(torch, dtype)
    floats = {n: x for n, x in inputs.items() if x.is_floating_point()}
    leaves = [x.clone().requires_grad_(grads) for x in (*qkv, *floats.values())]
    ref = dense(*leaves[:3], mod, mask, {**inputs, **dict(zip(floats, leaves[3:], strict=True))})
    kernel = attncc.compile(spec, backend=backend, dtype=dtype)
    args = [x.detach().to(tdtype).requires_grad_(grads) for x in leaves]
    ins = {**inputs, **dict(zip(floats, args[3:], strict=True))}
    if name == "padding_at_float32_min":
        ins["pad"] = ins["pad"].detach().to(tdtype)  # its gradient is not checked at -3.4e38
    if backend == "numpy":
        arrays = {n: x.detach().numpy() for n, x in ins.items()}
        out = torch.from_numpy(np.asarray(kernel(*(x.detach().numpy() for x in args[:3]),
                                                 **arrays)))
    else:
        out = kernel(*args[:3], **ins)
    tol = 1e-9 if dtype == "float64" else 2e-5
    torch.testing.assert_close(out.double().detach(), ref.detach(), atol=tol * 100, rtol=tol)
    if not grads:
        return
    d_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    wrt = [i for i, n in enumerate(["q", "k", "v", *floats]) if n != "pad"]  # q, k, v, inputs
    want = torch.autograd.grad(ref, [leaves[i] for i in wrt], d_out)
    got = torch.autograd.grad(out, [args[i] for i in wrt], d_out.to(tdtype))
    for a, w in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), w, atol=tol * 1000, rtol=tol * 100)


@pytest.mark.parametrize("name", CATALOGUE)
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_catalogue_forward_and_backward(name, backend):
    check(name, backend, "float64", grads=backend == "torch")
    check(name, backend, "float32", grads=backend == "torch")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="Triton needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("name", CATALOGUE)
def test_catalogue_on_triton(name):
    pytest.importorskip("triton")
    check(name, "triton", "float32", grads=True)


class KVCopies(TorchDispatchMode):
    """Records the copying aten ops whose result has k's shape broadcast to q's batch."""

    COPIES = frozenset({"clone", "_to_copy", "copy_", "repeat", "cat", "index_select", "index",
                        "expand_copy", "repeat_interleave"})

    def __init__(self, shape):
        super().__init__()
        self.shape, self.seen = tuple(shape), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (func._schema.name.split("::")[-1] in self.COPIES and isinstance(out, torch.Tensor)
                and tuple(out.shape) == self.shape):
            self.seen.append(str(func))
        return out


@pytest.mark.parametrize("backend", ["numpy", "torch", "triton"])
def test_a_kv_cache_shared_by_the_batch(backend):
    """k, v of batch 1 serve every batch entry of q (broadcast views, not copies: no aten op
    copies them to q's batch, forward or backward)."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton needs TRITON_INTERPRET=1 here")
    spec, (q, k, v), _, mod, mask, _ = problem("alibi_formula", "float64")
    k1, v1 = (x[:1].clone().requires_grad_() for x in (k, v))
    q = q.clone().requires_grad_()
    ref = dense(q, k1.expand(B, -1, -1, -1), v1.expand(B, -1, -1, -1), mod, mask, {})
    kernel = attncc.compile(spec, backend=backend, dtype="float64")
    if backend == "numpy":
        out = torch.from_numpy(kernel(*(x.detach().numpy() for x in (q, k1, v1))))
        torch.testing.assert_close(out, ref.detach())
        return
    kernel(q, k1, v1)  # compiled and planned before the copies are counted
    with KVCopies((B, *k1.shape[1:])) as copies:
        out = kernel(q, k1, v1)
        got = torch.autograd.grad(out.sum(), (q, k1, v1))
    assert copies.seen == []
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    want = torch.autograd.grad(ref.sum(), (q, k1, v1))
    for a, w in zip(got, want, strict=True):
        torch.testing.assert_close(a, w, atol=1e-6, rtol=1e-6)



@pytest.mark.parametrize("backend", ["numpy", "torch", "triton"])
def test_rows_with_only_minus_inf_scores_are_fully_masked(backend):
    """``where(c, score, -inf)`` leaving a row no key: output 0 and lse -inf, as a masked row."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton needs TRITON_INTERPRET=1 here")
    spec, qkv, _, _, _, _ = problem("neg_inf_where", "float64")  # rows 0, 1 keep no key
    kernel = attncc.compile(spec, backend=backend, dtype="float64")
    out, lse = kernel(*(x.numpy() if backend == "numpy" else x for x in qkv), return_lse=True)
    out, lse = np.asarray(out), np.asarray(lse)
    assert (out[:, :, :2] == 0).all() and (lse[:, :, :2] == -np.inf).all()
    assert np.isfinite(lse[:, :, 2:]).all()
