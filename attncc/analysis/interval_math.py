"""Arithmetic on interval bounds for ``attncc.analysis.intervals``: sums, products, powers and
the three-valued comparisons, on NumPy arrays of bounds that broadcast against each other.

Integer bounds are int64 (or Python ints for sizes) of magnitude at most ``INT_LIMIT``; float bounds
may be infinite or NaN (unknown). Every function here is pure.
"""

from __future__ import annotations

import functools

import numpy as np
import sympy

from attncc.spec.symbols import Log2

#: Relative slack when a comparison reads floats: rounding may differ from the evaluator's.
FLOAT_SLACK = 1e-9
#: Largest magnitude of an exact integer bound; twice it still fits int64, so one sum never wraps.
INT_LIMIT = float(2 ** 62)
NEVER, MAYBE, ALWAYS = 0, 1, 2


def _is_int(x) -> bool:
    return isinstance(x, int) or (isinstance(x, np.ndarray | np.generic)
                                  and np.issubdtype(x.dtype, np.integer))


def _nan_where(mask, lo, hi):
    """Bounds with NaN (unknown) where ``mask`` holds."""
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    return np.where(mask, np.nan, lo), np.where(mask, np.nan, hi)


def _nan_source(expr) -> bool:
    """Whether ``expr`` can be NaN or infinite: it has a log, exp or non-natural power."""
    return any(isinstance(node, sympy.log | sympy.exp | sympy.tan | Log2)
               or (isinstance(node, sympy.Pow) and not (node.exp.is_Integer and node.exp >= 0))
               for node in sympy.preorder_traversal(expr))


def _widen(lo, hi):
    """Float bounds pushed out by the rounding slack (NaN stays NaN)."""
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    slack = FLOAT_SLACK * (1.0 + np.maximum(np.abs(lo), np.abs(hi)))
    return lo - slack, hi + slack


def _infinite(lo, hi):
    """Where a bound is not finite (inf % m and inf - inf are NaN)."""
    return ~(np.isfinite(lo) & np.isfinite(hi))


def _cleared(diff):
    """``diff`` with rational coefficients cleared by a positive constant denominator, when it
    has any, so that linear relations stay exact integer arithmetic."""
    if diff.is_integer or not any(not r.is_Integer for r in diff.atoms(sympy.Rational)):
        return diff
    num, den = sympy.fraction(sympy.together(diff))
    if den.is_Integer and den > 0 and num.is_integer:
        return num
    return diff


def _scale(lo, hi, c):
    return (lo * c, hi * c) if c >= 0 else (hi * c, lo * c)


#: Abramowitz & Stegun 7.1.26: erf(x) = 1 - t (a1 + t (a2 + ...)) exp(-x^2), t = 1 / (1 + p x)
#: for x >= 0, within 1.5e-7; ``ERF_SLACK`` pushes the bounds out past that error.
_ERF_P, _ERF_A = 0.3275911, (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)
ERF_SLACK = 5e-7


def _erf_bounds(lo, hi):
    """Bounds of erf over ``[lo, hi]`` (erf is monotone): a vectorised approximation at each
    end, pushed out by more than its error and kept within [-1, 1] (NaN stays NaN)."""
    def erf(x):
        x = np.asarray(x, dtype=np.float64)
        a = np.abs(x)
        t = 1.0 / (1.0 + _ERF_P * a)
        poly = functools.reduce(lambda acc, c: acc * t + c, _ERF_A, 0.0) * t
        return np.copysign(1.0 - poly * np.exp(-a * a), x)

    return np.maximum(erf(lo) - ERF_SLACK, -1.0), np.minimum(erf(hi) + ERF_SLACK, 1.0)


def _int_sum_state(kind, los: list, his: list):
    """State of ``sum(x_i) <kind> 0`` for integer intervals ``[los[i], his[i]]``.

    The sums are never materialized: ``a + b <= c`` is tested as ``a <= c - b`` with the largest
    term alone on the right, so block pairs cost one broadcast comparison per bound.
    """
    if kind in (sympy.Equality, sympy.Unequality):
        meets = _sum_cmp(los, 0, np.less_equal) & _sum_cmp(his, 0, np.greater_equal)
        point = _sum_cmp(los, 0, np.greater_equal) & _sum_cmp(his, 0, np.less_equal)
        state = _tri(point, meets)
        return state if kind is sympy.Equality else ALWAYS - state
    bound = -1 if kind is sympy.StrictLessThan else 0
    return _tri(_sum_cmp(his, bound, np.less_equal), _sum_cmp(los, bound, np.less_equal))


def _sum_cmp(terms: list, bound: int, cmp):
    """``cmp(sum(terms), bound)``, with terms of one shape added first and the largest group
    moved to the right-hand side."""
    groups: dict = {}
    for t in terms:
        shape = np.shape(t)
        groups[shape] = groups[shape] + t if shape in groups else t
    parts = sorted(groups.values(), key=np.size)
    if len(parts) == 1:
        return cmp(parts[0], bound)
    return cmp(sum(parts[1:-1], start=parts[0]), bound - parts[-1])


def _tri(always, not_never):
    """int8 state from ALWAYS and not-NEVER conditions (``always`` implies ``not_never``)."""
    if isinstance(always, bool | np.bool_) and isinstance(not_never, bool | np.bool_):
        return int(always) + int(not_never)
    return np.add(always, not_never, dtype=np.int8)


def _power(lo, hi, n: int):
    a, c = lo ** n, hi ** n
    if n % 2:
        return a, c
    straddle = (np.asarray(lo) < 0) & (np.asarray(hi) > 0)
    return np.where(straddle, 0, np.minimum(a, c)), np.maximum(a, c)


def _big(v: int) -> float:
    """``float(v)``, or infinity where ``v`` is past the float range."""
    return float(v) if abs(v).bit_length() < 1000 else np.inf * (1 if v > 0 else -1)


def _magnitude(lo, hi) -> float:
    """Largest ``|x|`` over integer bounds (as a float: no int64 ``abs`` wraps)."""
    return max(abs(float(np.min(lo))), abs(float(np.max(hi))))


def _floats(parts):
    return [(np.asarray(lo, np.float64), np.asarray(hi, np.float64)) for lo, hi in parts]


def _sum(parts):
    lo, hi = parts[0]
    for a_lo, a_hi in parts[1:]:
        lo, hi = lo + a_lo, hi + a_hi
    return lo, hi


def _times(a, b):
    corners = (a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1])
    return functools.reduce(np.minimum, corners), functools.reduce(np.maximum, corners)
