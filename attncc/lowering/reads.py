"""Input reads in range, checked on the host: the reference's InputError for kernels that cannot
check inside (Triton's printer clamps every index, so a read past an input would silently take
its nearest element).

The reference evaluates score_mod and mask at every (b, h, q_idx, kv_idx) and raises where an
input is indexed outside an axis. ``Reads(node).check(sizes, inputs)`` finds the same: per input
read and axis, the index expression's smallest and largest value over the whole domain.

- First a sound interval bound (``attncc.analysis.intervals``; an input read inside the index
  bounded by the whole input's min and max). Most indices need nothing more: ``h``,
  ``q_idx - kv_idx + seq_k - 1``, ``abs(q_idx - kv_idx)``, T5's log buckets,
  ``doc[b, q_idx] - doc[b, kv_idx] + 63`` with ids in range.
- Where the bound leaves the axis, the exact extremes. An affine index in the index symbols
  takes them at the corners of the domain (2**k points). Any other index is evaluated over the
  positions of the symbols it reads: over ``q_idx - kv_idx`` where it reads the positions only
  through their difference, else in chunks of rows where it reads both.

Under a Linformer projection kv_idx runs over the projected keys, as in the block plan. An
index that depends on the sizes alone is checked once per sizes; one that reads what the host
does not have (the score, a summation variable) is left to the kernel. The message is the
reference's (``attncc.spec.numeric``).
"""

from __future__ import annotations

import math

import numpy as np
import sympy

from attncc.analysis.intervals import interval
from attncc.errors import InputError
from attncc.plan import host_array
from attncc.spec.numeric import evaluate
from attncc.spec.symbols import INDEX_SYMBOLS

#: Most index values evaluated at once (a chunk of rows where an index reads both positions).
CHUNK = 1 << 22
#: ``q_idx - kv_idx``, for an index that reads the positions only through it (T5's buckets).
OFFSET = sympy.Symbol("_offset", integer=True)
#: Sizes remembered as checked (decoding brings a new seq_k every step).
MAX_CHECKED = 256


class Reads:
    """The input reads of a fused ``node``'s score_mod and mask, and their bounds check."""

    def __init__(self, node):
        exprs = [e for e in (node.score_mod, node.mask.expr if node.mask is not None else None)
                 if e is not None]
        found = {a for e in exprs for a in e.atoms(sympy.Indexed)}
        self.reads = sorted(found, key=str)
        self.keys = node.projection  # the keys kv_idx runs over (None: seq_k)
        self._checked: set = set()

    def check(self, sizes: dict, inputs: dict) -> None:
        """Raise InputError where a read of ``inputs`` (name -> tensor or array, as ``bind``
        checked them) leaves its input's axis at these ``sizes``."""
        if not self.reads:
            return
        key = tuple(sorted(sizes.items()))
        if len(self._checked) > MAX_CHECKED:
            self._checked.clear()
        known = set(INDEX_SYMBOLS) | set(sizes) | set(inputs)
        extent = {"b": sizes["batch"], "h": sizes["heads"], "q_idx": sizes["seq_q"],
                  "kv_idx": self.keys or sizes["seq_k"]}
        for read in self.reads:
            name = read.base.label.name
            shape = tuple(inputs[name].shape)
            for axis, index in enumerate(read.indices):
                symbols = {s.name for s in index.free_symbols if isinstance(s, sympy.Symbol)}
                if not symbols <= known:
                    continue  # reads the score or a bound variable: the kernel's to check
                inner = {a.base.label.name for a in index.atoms(sympy.Indexed)}
                if not inner and (key, name, axis) in self._checked:
                    continue
                host = {n: host_array(inputs[n]) for n in inner}
                if not _bounded(index, shape[axis], extent, sizes, host):
                    lo, hi = _extremes(index, extent, sizes, host)
                    if not (lo >= 0 and hi < shape[axis]):  # NaN too
                        raise InputError(f"input '{name}' is indexed outside its axis {axis} "
                                         f"of size {shape[axis]} by {index}")
                if not inner:
                    self._checked.add((key, name, axis))


def _bounded(index, size: int, extent: dict, sizes: dict, inputs: dict) -> bool:
    """Whether a sound interval bound of ``index`` (floored) lies inside ``[0, size)``, each
    index symbol over ``range(extent[name])``."""
    boxes = {n: (v, v) for n, v in sizes.items()}
    boxes.update({n: (0, e - 1) for n, e in extent.items()})
    leaves = {a: _span(inputs[a.base.label.name]) for a in index.atoms(sympy.Indexed)}
    try:
        lo, hi = interval(index, boxes, leaves)
    except (KeyError, TypeError, ValueError):
        return False
    lo, hi = float(np.min(lo)), float(np.max(hi))
    return math.isfinite(lo) and math.isfinite(hi) and math.floor(lo) >= 0 and (
        math.floor(hi) < size)


def _span(table) -> tuple:
    """The smallest and largest element of ``table``: ints for an integer table."""
    lo, hi = np.min(table), np.max(table)
    if np.issubdtype(table.dtype, np.integer) or table.dtype == bool:
        return int(lo), int(hi)
    return float(lo), float(hi)


def _extremes(index, extent: dict, sizes: dict, inputs: dict) -> tuple[float, float]:
    """The smallest and largest value of ``index`` (floored) over the domain."""
    names = sorted(s.name for s in index.free_symbols if s.name in INDEX_SYMBOLS)
    extents = [extent[n] for n in names]
    if _affine(index, names):  # extremes at the corners
        points = [np.array([0, n - 1], dtype=np.int64) for n in extents]
        return _range(index, names, points, sizes, inputs)
    if {"q_idx", "kv_idx"} <= set(names):  # a function of q_idx - kv_idx: over the offsets
        offset = index.subs(INDEX_SYMBOLS["q_idx"], INDEX_SYMBOLS["kv_idx"] + OFFSET)
        if INDEX_SYMBOLS["kv_idx"] not in offset.free_symbols:
            rest = [n for n in names if n not in ("q_idx", "kv_idx")]
            points = [np.arange(extent[n], dtype=np.int64) for n in rest]
            points.append(np.arange(1 - extent["kv_idx"], extent["q_idx"], dtype=np.int64))
            return _range(offset, [*rest, OFFSET.name], points, sizes, inputs)
    # rows of q_idx in chunks where the index reads more positions than fit at once
    total = math.prod(extents)
    rows = extent["q_idx"]
    step = rows if total <= CHUNK or "q_idx" not in names else max(1, CHUNK // (total // rows))
    lo, hi = math.inf, -math.inf
    for start in range(0, rows if "q_idx" in names else 1, step):
        points = [np.arange(start, min(start + step, n), dtype=np.int64) if name == "q_idx"
                  else np.arange(n, dtype=np.int64) for name, n in zip(names, extents,
                                                                       strict=True)]
        a, b = _range(index, names, points, sizes, inputs)
        if math.isnan(a) or math.isnan(b):  # a NaN index: no element
            return math.nan, math.nan
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

