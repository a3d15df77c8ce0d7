"""The sdpa path as code ``torch.compile`` traces (``TorchKernel.traceable``): plain torch ops.

Under ``torch.compile`` dynamo traces these functions, so they hold no sympy, numpy or attncc
call machinery: the spec's scale is turned into a Python ``math`` function once, eagerly
(``scale_function``); a call's sizes are checked with comparisons dynamo turns into guards
(``sizes``), and any call those checks cannot vouch for is declined, so the library op runs and
the eager prologue gives its message; the bottom-right causal mask is built from torch ops
(``tail``).
"""

from __future__ import annotations

from collections.abc import Callable

import sympy
import torch

from attncc.lowering.prologue import COMPUTE
from attncc.spec.symbols import SIZES

#: The input dtypes the prologue accepts.
DTYPES = tuple(getattr(torch, name) for name in COMPUTE)


def scale_function(expr) -> Callable[[dict], float] | None:
    """``scale(sizes) -> float``: the spec's scale ``expr`` at a call's ``sizes`` (``sizes``'s
    names), as plain Python (a constant, or ``sympy.lambdify`` on ``math``); None where the
    scale is a constant that is not a finite real number (the prologue rejects every call)."""
    expr = sympy.sympify(expr)
    names = sorted(symbol.name for symbol in expr.free_symbols)
    if not names:
        if not (expr.is_real and expr.is_finite):
            return None
        value = float(expr)
        return lambda sizes: value
    at = sympy.lambdify([SIZES[name] for name in names], expr, modules="math")
    return lambda sizes: at(*(sizes[name] for name in names))  # a SymFloat on symbolic sizes


def sizes(q, k, v, fixes: dict) -> dict | None:
    """The sizes (``attncc.bind``'s names) of a call ``bind`` accepts without a broadcast or a
    cast: three 4-D tensors of one prologue dtype on one device, k and v of q's batch with equal
    kv heads and keys, k of q's head size, every size positive, kv heads dividing the query
    heads, and the sizes the spec fixes (``fixes``: name -> int or None) as fixed; else None."""
    if not all(isinstance(x, torch.Tensor) and x.dim() == 4 for x in (q, k, v)):
        return None
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return None
    if k.device != q.device or v.device != q.device:
        return None
    batch, heads, seq_q, head_dim = q.shape
    found = {"batch": batch, "heads": heads, "kv_heads": k.shape[1], "seq_q": seq_q,
             "seq_k": k.shape[2], "head_dim": head_dim, "value_dim": v.shape[3]}
    if (k.shape[0] != batch or v.shape[0] != batch or v.shape[1] != k.shape[1]
            or v.shape[2] != k.shape[2] or k.shape[3] != head_dim):
        return None
    if min(found.values()) < 1 or heads % found["kv_heads"]:
        return None
    if any(fixed is not None and fixed != found[name] for name, fixed in fixes.items()):
        return None
    return found


def tail(nq, nk, dtype, device):
    """The bottom-right causal mask ``(1, 1, nq, nk)`` as a bool tensor (row i keeps keys
    ``<= i + nk - nq``); None for one query row (it sees every key). ``dtype`` is unused: the
    signature is ``TorchKernel._tail``'s."""
    if nq == 1:
        return None
    return torch.ones((nq, nk), dtype=torch.bool, device=device).tril(nk - nq)[None, None]

