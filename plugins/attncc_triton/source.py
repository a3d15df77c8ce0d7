"""Assembling the generated module: glossary header, SPEC/CONFIG, kernels, host runtime, entry.

The text is a standalone Python module (only torch and triton needed): ``attncc compile --backend
triton -o DIR`` writes it as ``kernel.py``, and the attncc kernel imports the very same text.
"""

from __future__ import annotations

from pathlib import Path

import sympy

from attncc.ir.graph import FusedAttention, LinearAttention, Nystrom
from attncc.passes.masks import mask_dependencies
from attncc.spec.symbols import SIZE_NAMES

from .fused import FusedGenerator, FusedSpec
from .linear import linear_kernel

_HELPERS = '''@triton.jit
def _floordiv(a, b):
    """a // b rounded toward minus infinity (Python's //), however the hardware truncates."""
    a = a + b * 0
    b = b + a * 0
    qa = tl.abs(a) // tl.abs(b)
    neg = (a < 0) != (b < 0)
    q = tl.where(neg, -qa, qa)
    return tl.where(neg & (q * b != a), q - 1, q)


@triton.jit
def _mod(a, b):
    """a % b with the sign of b (Python's %)."""
    return a - _floordiv(a, b) * b


@triton.jit
def _tanh(x):
    """tanh without cancellation: Taylor to x**15 near 0 (|x| < 0.5 in float32, where it is exact
    to rounding; |x| < 0.05 in float64), 2*sigmoid(2x) - 1 above."""
    x2 = x * x
    p = -929569.0 / 638512875.0
    p = p * x2 + 21844.0 / 6081075.0
    p = p * x2 - 1382.0 / 155925.0
    p = p * x2 + 62.0 / 2835.0
    p = p * x2 - 17.0 / 315.0
    p = p * x2 + 2.0 / 15.0
    p = p * x2 - 1.0 / 3.0
    p = p * x2 + 1.0
    near = 0.05 if x.dtype == tl.float64 else 0.5
    return tl.where(tl.abs(x) < near, x * p, 2.0 * tl.sigmoid(2.0 * x) - 1.0)
'''

_GLOSSARY = '''Glossary
  b, h, kvh        batch, query head, kv head (h // (heads // kv_heads): GQA/MQA share k, v)
  q_idx, kv_idx    query / key positions of the tile, shapes [BLOCK_M, 1] and [1, BLOCK_N]
  score, s         the raw score (scale * q.k, or additive), and s after the score_mod
  keep             the pairs that count: in bounds, and the mask (PARTIAL blocks only)
  FC/FI, PC/PI     block plan: per query block, the count and indices of its FULL and PARTIAL
                   key blocks (the dk/dv kernel gets the transposed tables); EMPTY: never visited
  m_i, l_i, acc    online softmax: running row max, running sum, unnormalized output
  lse              log-sum-exp per query row (-inf where no key is kept); thr: top-k threshold
  MEM, MK, MV      memory tokens (always kept, no score_mod or mask) and their k, v
  ACC              accumulation dtype: float32, or float64 for float64 tensors
  x_ptr, x_sI, x_nI  spec input x: pointer, stride and size of axis I (loads are bounds-guarded)

Entry point: attention(q, k, v, *, return_lse=False, tables=None, **inputs). ``tables`` is a dict
of precomputed plan tables (fc, fi, pc, pi and the transposed fct, fit, pct, pit: int32, counts
(Bp, Hp, nQ), indices (Bp, Hp, nQ, width)); without it the ``_classify`` kernel builds them on the
device from the mask (cached per shape when the mask reads no input).'''


def fused_spec(spec, node: FusedAttention) -> FusedSpec:
    return FusedSpec(score=node.score, score_mod=node.score_mod,
                     mask=node.mask.expr if node.mask is not None else None,
                     normalize=node.normalize, topk=node.topk, memory_tokens=node.memory_tokens,
                     float_inputs={n for n, i in spec.inputs.items() if i.is_float})


def _scale_function(scale) -> str:
    args = ", ".join(SIZE_NAMES)
    body = sympy.pycode(sympy.sympify(scale).evalf(17) if not scale.free_symbols else scale,
                        fully_qualified_modules=True)
    return f"def scale_of({args}):\n    \"\"\"The score scale for these sizes.\"\"\"\n" \
           f"    return {body}\n"


def _runtime_text() -> str:
    text = (Path(__file__).parent / "runtime.py").read_text(encoding="utf-8")
    marker = "import triton.language as tl\n"
    return text[text.index(marker) + len(marker):].lstrip("\n")


def generate(spec, node, config: dict) -> str:
    """The whole module for ``spec``'s attention ``node`` compiled with ``config``."""
    if isinstance(node, FusedAttention):
        fs, kind = fused_spec(spec, node), "fused"
    else:  # Nyström calls the dense softmax kernel twice; linear only needs the dense classifier
        fs = FusedSpec("dot", None, None, "softmax", None, 0)
        kind = "linear" if isinstance(node, LinearAttention) else "nystrom"
    ndims = {n: len(i.shape) for n, i in spec.inputs.items()}
    gen = FusedGenerator(fs, ndims)
    mask_reads, varies = mask_dependencies(fs.mask)
    meta = {
        "name": spec.name, "hash": spec.hash, "kind": kind, "score": fs.score,
        "normalize": fs.normalize, "topk": fs.topk, "memory_tokens": fs.memory_tokens,
        "lowrank": spec.lowrank.method if spec.lowrank is not None else None,
        "landmarks": node.landmarks if isinstance(node, Nystrom) else None,
        "feature_map": spec.feature_map, "features": spec.features,
        "causal": bool(getattr(node, "causal", False)), "expr_inputs": fs.expr_inputs,
        "grad_inputs": fs.grad_inputs, "mask_inputs": list(mask_reads),
        "plan_b": "b" in varies, "plan_h": "h" in varies,
    }
    doc = [f'"""attncc-generated Triton kernels for the spec {spec.name!r} ({kind}).', "",
           f"spec hash: {spec.hash}", f"config:    {config}",
           f"score:     {fs.score}, scale {spec.scale}",
           f"score_mod: {fs.score_mod}", f"mask:      {fs.mask}",
           f"normalize: {fs.normalize}" + (f" (top {fs.topk})" if fs.topk else ""),
           f"memory:    {fs.memory_tokens} token(s)", "", _GLOSSARY, '"""']
    parts = ["\n".join(doc), "import math  # noqa: F401 - used by scale_of\nimport types\n\n"
             "import torch\nimport triton\nimport triton.language as tl\n",
             f"SPEC = {meta!r}\nCONFIG = {dict(config)!r}\n", _scale_function(spec.scale),
             'SPEC["scale"] = scale_of\n', _HELPERS]
    parts += [gen.forward(), gen.backward_dq(), gen.backward_dkdv(), gen.classify()]
    if kind == "linear":
        parts.append(linear_kernel())
    parts.append(_runtime_text())
    parts.append('''
_KERNELS = types.SimpleNamespace(
    fwd=_fwd, bwd_dq=_bwd_dq, bwd_dkdv=_bwd_dkdv, classify=_classify,
    linear=globals().get("_linear"), linear_bwd=globals().get("_linear_bwd"))


def attention(q, k, v, *, return_lse=False, tables=None, **inputs):
    """Attention of q (B, H, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) as the spec says.

    Returns out (B, H, Nq, Dv), and with ``return_lse`` also the log-sum-exp (B, H, Nq).
    Differentiable in q, k, v and the floating inputs. ``tables``: see the module docstring.
    """
    return run(_KERNELS, SPEC, CONFIG, q, k, v, return_lse, tables, inputs)
''')
    return "\n\n".join(p.rstrip("\n") + "\n" for p in parts)
