"""Input reads in range, checked on the host: the reference's InputError for kernels that cannot
check inside (Triton's printer clamps every index, so a read past an input would silently take
its nearest element).

The reference evaluates score_mod and mask at every (b, h, q_idx, kv_idx) and raises where an
input is indexed outside an axis. ``Reads(node).check(sizes, inputs)`` finds the same: per input
read and axis, the index expression's smallest and largest value over the whole domain.

- An affine index in the index symbols (``h``, ``q_idx - kv_idx + seq_k - 1``) takes its
  extremes at the corners of the domain, so 2**k points decide it. The answer depends on the
  sizes only and is cached per sizes.
- Any other index is evaluated over the aranges of the symbols it reads, in chunks of rows
  where it reads both positions. Examples: ``q_idx // 64``, or ``doc[b, q_idx]`` inside
  ``tbl[...]``. Such indices are evaluated on every call where they read an input.

The message is the reference's (``attncc.spec.numeric``).
"""

from __future__ import annotations

import math

import numpy as np
import sympy

from attncc.errors import InputError
from attncc.spec.numeric import evaluate
from attncc.spec.symbols import INDEX_SYMBOLS

#: Index symbol -> the size it ranges over.
EXTENT = {"b": "batch", "h": "heads", "q_idx": "seq_q", "kv_idx": "seq_k"}
#: Most index values evaluated at once (a chunk of rows where an index reads both positions).
CHUNK = 1 << 22


class Reads:
    """The input reads of a fused ``node``'s score_mod and mask, and their bounds check."""

    def __init__(self, node):
        exprs = [e for e in (node.score_mod, node.mask.expr if node.mask is not None else None)
                 if e is not None]
        self.reads = sorted({a for e in exprs for a in e.atoms(sympy.Indexed)}, key=str)
        self._checked: set = set()

    def check(self, sizes: dict, inputs: dict) -> None:
        """Raise InputError where a read of ``inputs`` (name -> tensor or array) leaves its
        input's axis at these ``sizes``; the reads that depend on the sizes alone are checked
        once per sizes."""
        if not self.reads:
            return
        key = tuple(sorted(sizes.items()))
        host = None
        for read in self.reads:
            name = read.base.label.name
            shape = tuple(inputs[name].shape)
            for axis, index in enumerate(read.indices):
                reads_inputs = bool(index.atoms(sympy.Indexed))
                if not reads_inputs and (key, name, axis) in self._checked:
                    continue
                if reads_inputs and host is None:
                    host = {n: _numpy(x) for n, x in inputs.items()}
                lo, hi = _extremes(index, sizes, host or {})
                if lo < 0 or hi >= shape[axis]:
                    raise InputError(f"input '{name}' is indexed outside its axis {axis} of size "
                                     f"{shape[axis]} by {index}")
                if not reads_inputs:
                    self._checked.add((key, name, axis))


def _extremes(index, sizes: dict, inputs: dict) -> tuple[float, float]:
    """The smallest and largest value of ``index`` (floored) over the domain."""
    names = sorted(s.name for s in index.free_symbols if s.name in INDEX_SYMBOLS)
    extents = [sizes[EXTENT[n]] for n in names]
    if _affine(index, names):  # extremes at the corners
        points = [np.array([0, n - 1], dtype=np.int64) for n in extents]
        return _range(index, names, points, sizes, inputs)
    # rows of q_idx in chunks where the index reads more positions than fit at once
    total = math.prod(extents)
    step = sizes["seq_q"] if total <= CHUNK or "q_idx" not in names else max(
        1, CHUNK // (total // sizes["seq_q"]))
    lo, hi = math.inf, -math.inf
    for start in range(0, sizes["seq_q"] if "q_idx" in names else 1, step):
        points = [np.arange(start, min(start + step, n), dtype=np.int64) if name == "q_idx"
                  else np.arange(n, dtype=np.int64) for name, n in zip(names, extents,
                                                                       strict=True)]
        a, b = _range(index, names, points, sizes, inputs)
        lo, hi = min(lo, a), max(hi, b)
    return lo, hi


def _range(index, names, points, sizes: dict, inputs: dict) -> tuple[float, float]:
    """Min and max of ``index`` (floored) with each symbol of ``names`` taking ``points`` on an
    axis of its own."""
    env = {**sizes, **inputs}
    for axis, (name, values) in enumerate(zip(names, points, strict=True)):
        shape = [1] * len(names)
        shape[axis] = values.size
        env[name] = values.reshape(shape)
    value = np.floor(np.asarray(evaluate(index, env, np), dtype=np.float64))
    return float(value.min()), float(value.max())


def _affine(index, names) -> bool:
    """Whether ``index`` is affine in the index symbols ``names``, reading no input."""
    if index.atoms(sympy.Indexed, sympy.Function):
        return False
    symbols = [INDEX_SYMBOLS[n] for n in names]
    try:
        return sympy.Poly(index, *symbols).total_degree() <= 1 if symbols else True
    except sympy.PolynomialError:
        return False


def _numpy(x):
    """An input as a host NumPy array (a torch tensor moved to the CPU)."""
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)
