"""Assembling the generated module: docstring and glossary, SPEC/CONFIG, kernels, entry point.

The text is a Python module that needs only torch, triton and its host runtime, ``runtime.py``,
which it imports as the sibling module ``RUNTIME``, named by the runtime's content digest so that
a module and its runtime always match (``runtime``'s docstring says how each file is found).
"""

from __future__ import annotations

import hashlib
import pprint
import re
import textwrap
from pathlib import Path

import sympy

from attncc.ir.graph import FusedAttention, LinearAttention, Nystrom
from attncc.spec.symbols import SIZE_NAMES

from .fused import FusedGenerator
from .linear import linear_kernel

RUNTIME_TEXT = (Path(__file__).parent / "runtime.py").read_text(encoding="utf-8")
#: The module name the generated modules import their runtime as.
RUNTIME = f"attention_runtime_{hashlib.sha256(RUNTIME_TEXT.encode()).hexdigest()[:12]}"

#: The jit helpers printed code may call, by name (a module gets those it calls).
HELPERS = {"_tan": '''@triton.jit
def _tan(x):
    """tan as sin / cos."""
    return tl.sin(x) / tl.cos(x)
''', "_round": '''@triton.jit
def _round(x):
    """The nearest integer, ties to even (NumPy's and torch's round)."""
    r = tl.floor(x + 0.5)
    return tl.where((r - x == 0.5) & (r - 2.0 * tl.floor(r * 0.5) != 0.0), r - 1.0, r)
''', "_sign": '''@triton.jit
def _sign(x):
    """-1, 0 or 1."""
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
''', "_clamp": '''@triton.jit
def _clamp(i, n):
    """i clamped into [0, n): an index past an input's axis reads its nearest element."""
    return tl.minimum(tl.maximum(i, 0), n - 1)
''', "_floordiv": '''@triton.jit
def _floordiv(a, b):
    """a // b rounded toward minus infinity (Python's //), however the hardware truncates."""
    a = a + b * 0
    b = b + a * 0
    qa = tl.abs(a) // tl.abs(b)
    neg = (a < 0) != (b < 0)
    q = tl.where(neg, -qa, qa)
    return tl.where(neg & (q * b != a), q - 1, q)
''', "_mod": '''@triton.jit
def _mod(a, b):
    """a % b with the sign of b (Python's %)."""
    return a - _floordiv(a, b) * b
''', "_tanh": '''@triton.jit
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
'''}

_GLOSSARY = '''Glossary
  b, h, kvh        batch, query head, kv head (h // (heads // kv_heads): GQA/MQA share k, v)
  q_idx, kv_idx    query / key positions of the tile, shapes [BLOCK_M, 1] and [1, BLOCK_N]
  score, s         the raw score (scale * q.k, or additive), and s after the score_mod
  keep             the pairs that count: in bounds, and the mask (PARTIAL blocks only)
  FC/FI, PC/PI     block plan: per query block, the count and indices of its FULL and PARTIAL
                   key blocks (the dk/dv kernel gets the transposed tables); EMPTY: never visited
  m_i, l_i, acc    online softmax: running row max, running sum, unnormalized output
  lse              log-sum-exp per query row (-inf where no key is kept)
  lse_lo, thr      THR's two rows: lse's rounding residual (p = exp((s - lse) - lse_lo)),
                   the top-k threshold
  MEM, mk_at       memory tokens (always kept, no score_mod or mask), their k (and v) rows
  ACC              accumulation dtype: float32, or float64 for float64 tensors
  x_ptr, x_sI, x_nI  spec input x: pointer, stride and size of axis I (loads are bounds-guarded)
  x_h              an input element that depends on (b, h) only, loaded once per head
  rd, red<n>       a bounded reduction's axis (its size padded to a power of two) and value:
                   tl.dot of the query-side ra<n> and key-side rb<n> tiles, or tl.sum over rd3

Entry point: attention(q, k, v, *, return_lse=False, tables=None, **inputs). ``tables``: the
block plan's int32 index tables (fc, fi, pc, pi and the transposed fct, fit, pct, pit; counts
(Bp, Hp, nQ), indices (Bp, Hp, nQ, width)), as attncc's Triton kernel passes them from
``attncc.plan`` (the one block classifier; this module has none). Without them every block is
PARTIAL where the spec has a mask (correct, the mask evaluated everywhere, no block skipped)
and FULL where it has none.'''


def _scale_function(scale) -> str:
    body = sympy.pycode(sympy.sympify(scale).evalf(17) if not scale.free_symbols else scale,
                        fully_qualified_modules=True)
    return (f"def scale_of({', '.join(SIZE_NAMES)}):\n"
            f'    """The score scale for these sizes."""\n    return {body}\n')


def generate(spec, node, config: dict, backward: bool = True) -> str:
    """The module for ``spec``'s attention ``node`` compiled with ``config``: the whole of it,
    or without ``backward`` the forward kernel alone (attncc's Triton kernel loads that at
    compile time and generates the whole module on the first backward call). A fused module
    whose derivative cannot be printed is forward-only, ``SPEC["no_backward"]`` saying why."""
    if isinstance(node, FusedAttention):
        fused, kind = node, "fused"
    else:  # Nyström calls the dense softmax kernel twice; linear attention has its own kernels
        fused = FusedAttention("dot", spec.scale, None, None, "softmax", None, 0)
        kind = "linear" if isinstance(node, LinearAttention) else "nystrom"
    ndims = {n: len(i.shape) or 1 for n, i in spec.inputs.items()}  # 0-d: viewed as (1,)
    generator = FusedGenerator(fused, {n for n, i in spec.inputs.items() if i.is_float}, ndims)
    meta = {
        "name": spec.name, "hash": spec.hash, "kind": kind, "normalize": fused.normalize,
        "topk": fused.topk, "memory_tokens": fused.memory_tokens, "masked": fused.mask is not None,
        "projection": getattr(node, "projection", None),
        "landmarks": node.landmarks if isinstance(node, Nystrom) else None,
        "feature_map": getattr(node, "feature_map", None),
        "features": getattr(node, "features", None),
        "causal": bool(getattr(node, "causal", False)), "expr_inputs": generator.expr_inputs,
    }
    doc = [f'"""attncc-generated Triton kernels for the spec {spec.name!r} ({kind}).', "",
           f"spec hash: {spec.hash}", f"config:    {config}",
           f"score:     {fused.score}, scale {spec.scale}", f"score_mod: {fused.score_mod}",
           f"mask:      {generator.mask}",
           f"normalize: {fused.normalize}" + (f" (top {fused.topk})" if fused.topk else ""),
           f"memory:    {fused.memory_tokens} token(s)"]
    doc = [*(wrapped for line in doc
             for wrapped in textwrap.wrap(line, 99, subsequent_indent=" " * 11) or [""]),
           "", _GLOSSARY, '"""']
    if kind == "linear":
        kernels = {"linear": "_linear", "linear_bwd": "_linear_bwd"}
        functions = [linear_kernel()]
    else:
        kernels = {"fwd": "_fwd", "bwd_dq": "_bwd_dq", "bwd_dkdv": "_bwd_dkdv"}
        functions = [f.text() for f in generator.functions(backward)]
        if generator.no_backward is not None or not backward:  # a backward call says why
            meta["no_backward"] = generator.no_backward or (
                "this module holds the forward kernel only; attncc generates the backward on "
                "the first backward call (generate(..., backward=True) writes both)")
            kernels = {"fwd": "_fwd"}
    scale = _scale_function(getattr(node, "scale", spec.scale))
    used = set(re.findall(r"\b_\w+(?=\()", "\n".join(functions)))
    helpers = [text for name, text in HELPERS.items()
               if name in used or (name == "_floordiv" and "_mod" in used)]
    table = ", ".join(f'"{k}": {v}' for k, v in kernels.items())
    parts = ["\n".join(doc),
             ("import math\n\n" if "math." in scale else "")
             + f"import triton\nimport triton.language as tl\nfrom {RUNTIME} import Program\n\n"
             f"SPEC = {pprint.pformat(meta, width=92, sort_dicts=False)}\n"
             f"CONFIG = {dict(config)!r}\n", scale, *helpers, *functions,
             f"PROGRAM = Program(SPEC, CONFIG, {{{table}}}, scale_of)\n",
             '''def attention(q, k, v, *, return_lse=False, tables=None, **inputs):
    """Attention of q (B, H, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) as the spec says.

    Returns out (B, H, Nq, Dv), and with ``return_lse`` also the log-sum-exp (B, H, Nq).
    Differentiable in q, k, v and the floating inputs. ``tables``: see the module docstring.
    """
    return PROGRAM.attention(q, k, v, return_lse, tables, inputs)
''']
    return "\n\n".join(p.rstrip("\n") + "\n" for p in parts)
