"""Three-valued interval evaluation of a mask over many boxes at once, vectorized with NumPy.

A box is a product of integer ranges of ``b, h, q_idx, kv_idx`` (inclusive ``lo..hi``). The boxes
are given as arrays that broadcast against each other (query blocks ``(nQ, 1)`` against key blocks
``(1, nK)``), so one pass over the expression tree classifies every block pair together. Sizes are
point intervals rather than substituted, so sympy never re-decides a relation exactly where the
float evaluator would not (``q_idx == sigmoid(42)``). A relation is decided on ``lhs - rhs``,
with rational coefficients cleared, and sums are compared without materializing them
(``a <= c - b``), which keeps causal and sliding-window plans at 1024x1024 blocks to a few
broadcast comparisons.

Numbers are intervals ``(lo, hi)`` of arrays (int64 where the value is an integer, float64
otherwise); a float bound of NaN means "may be anything, even NaN" and makes every comparison that
reads it undecided. Conditions are ``int8`` states ``NEVER=0, MAYBE=1, ALWAYS=2`` (the block plan's
``EMPTY, PARTIAL, FULL``), so ``and`` is ``minimum``, ``or`` is ``maximum``, ``not`` is ``2 - x``.

Soundness is the contract: ALWAYS means the condition holds at every point of the box, NEVER that
it holds at none, as ``attncc.spec.numeric.evaluate`` computes it; anything uncertain is MAYBE.
"""

from __future__ import annotations

import numpy as np
import sympy
from sympy.logic.boolalg import ITE

from attncc.errors import InputError
from attncc.spec.symbols import sigmoid

__all__ = ["ALWAYS", "MAYBE", "NEVER", "block_range", "classify", "interval"]

NEVER, MAYBE, ALWAYS = 0, 1, 2
#: Relative slack when a comparison reads floats: rounding may differ from the evaluator's.
FLOAT_SLACK = 1e-9

_MONOTONE = {sympy.exp: np.exp, sympy.tanh: np.tanh}


def classify(cond: sympy.Basic, boxes: dict, leaves: dict | None = None):
    """States (NEVER/MAYBE/ALWAYS, int8 broadcast over the boxes) of condition ``cond``.

    ``boxes`` maps each symbol name in ``cond`` to its ``(lo, hi)`` bounds: arrays for the index
    symbols (``b``, ``h``, ``q_idx``, ``kv_idx``), a point ``(n, n)`` for a size. ``leaves`` maps
    each ``sympy.Indexed`` input element in ``cond`` to the ``(lo, hi)`` interval of that input over
    the box. A Python int is returned where the state is the same for every box without reading
    any box. Raises KeyError for a symbol or input element without bounds.
    """
    with np.errstate(all="ignore"):  # inf and NaN bounds are expected and handled
        return _Intervals(boxes, leaves or {}).state(cond)


def interval(expr: sympy.Expr, boxes: dict, leaves: dict | None = None):
    """The ``(lo, hi)`` bounds of number ``expr`` over the boxes (see ``classify``)."""
    with np.errstate(all="ignore"):
        return _Intervals(boxes, leaves or {}).num(expr)


def block_range(values: np.ndarray, axis: int, block: int, length: int):
    """Per-block ``(min, max)`` of ``values[:length]`` along ``axis``, in blocks of ``block``.

    O(elements): one ``reduceat`` each; the last block is clipped to ``length``.
    """
    values = np.take(values, np.arange(length), axis=axis)
    if values.dtype == np.bool_:
        values = values.astype(np.int8)
    starts = np.arange(0, length, block)
    return np.minimum.reduceat(values, starts, axis=axis), np.maximum.reduceat(values, starts,
                                                                              axis=axis)


def _is_int(x) -> bool:
    return isinstance(x, int) or (isinstance(x, np.ndarray | np.generic)
                                  and np.issubdtype(x.dtype, np.integer))


def _nan_where(mask, lo, hi):
    """Bounds with NaN (unknown) where ``mask`` holds."""
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    return np.where(mask, np.nan, lo), np.where(mask, np.nan, hi)


class _Intervals:
    def __init__(self, boxes: dict, leaves: dict):
        self.boxes = boxes
        self.leaves = leaves
        self.memo: dict = {}

    # -- conditions --------------------------------------------------------------------------
    def state(self, e):
        if e in self.memo:
            return self.memo[e]
        result = self._state(e)
        self.memo[e] = result
        return result

    def _state(self, e):
        if e is sympy.true:
            return ALWAYS
        if e is sympy.false:
            return NEVER
        if isinstance(e, sympy.And | sympy.Or):
            pick = np.minimum if isinstance(e, sympy.And) else np.maximum
            result = self.state(e.args[0])
            for arg in e.args[1:]:
                result = pick(result, self.state(arg))
            return result
        if isinstance(e, sympy.Not):
            return ALWAYS - self.state(e.args[0])
        if isinstance(e, sympy.Rel):
            return self.relation(e)
        if isinstance(e, ITE):  # sympy's form of a condition chosen by a condition
            cond, then, other = (self.state(a) for a in e.args)
            same = np.where(then == other, then, np.int8(MAYBE))
            return np.where(cond == ALWAYS, then, np.where(cond == NEVER, other, same))
        raise TypeError(f"interval reasoning cannot classify {type(e).__name__}: {e}")

    def relation(self, e: sympy.Rel):
        """State of a comparison, decided on ``lhs - rhs`` against 0 (sympy cancels what the two
        sides share); integer relations use ``x < 0 <=> x <= -1``.

        Cancelling is unsound where a side is NaN or infinite (``nan <= nan`` is false,
        ``inf + 1 <= inf`` true), so where a side may be, the state is MAYBE.
        """
        state = self.relation_of_difference(e)
        if not any(_nan_source(side) for side in (e.lhs, e.rhs)):
            return state
        unknown = np.zeros((), dtype=bool)
        for side in (e.lhs, e.rhs):
            lo, hi = self.num(side)
            unknown = unknown | _infinite(lo, hi)
        return np.where(unknown, np.int8(MAYBE), state)

    def relation_of_difference(self, e: sympy.Rel):
        diff = _cleared(e.lhs - e.rhs)
        kind = type(e)
        if kind in (sympy.StrictGreaterThan, sympy.GreaterThan):
            diff = -diff
            kind = sympy.StrictLessThan if kind is sympy.StrictGreaterThan else sympy.LessThan
        terms = [self.num(a) for a in diff.args] if isinstance(diff, sympy.Add) else None
        if terms and all(_is_int(lo) and _is_int(hi) for lo, hi in terms):
            return _int_sum_state(kind, [t[0] for t in terms], [t[1] for t in terms])
        lo, hi = self.num(diff)
        if _is_int(lo) and _is_int(hi):
            return _int_sum_state(kind, [lo], [hi])
        lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            slack = FLOAT_SLACK * (1.0 + np.maximum(np.abs(lo), np.abs(hi)))
            if kind in (sympy.Equality, sympy.Unequality):
                # never ALWAYS: float equality is left to the elementwise mask
                state = np.asarray(~((lo > slack) | (hi < -slack)), dtype=np.int8)
                state = state if kind is sympy.Equality else ALWAYS - state
            elif kind is sympy.StrictLessThan:
                state = _lt_state(lo, hi, -slack, slack)
            else:
                state = _le_state(lo, hi, -slack, slack)
            unknown = np.isnan(lo) | np.isnan(hi)
        return np.where(unknown, np.int8(MAYBE), state)

    # -- numbers -----------------------------------------------------------------------------
    def num(self, e):
        if e in self.memo:
            return self.memo[e]
        result = self._num(e)
        self.memo[e] = result
        return result

    def _num(self, e):
        if e.is_Integer:
            return int(e), int(e)
        if e.is_Number:
            return float(e), float(e)
        if e.is_number:  # a constant such as E = exp(1) once sizes are substituted
            value = complex(e)
            value = value.real if value.imag == 0 else np.nan
            return np.float64(value), np.float64(value)
        if isinstance(e, sympy.Indexed):
            if e not in self.leaves:
                raise KeyError(f"no interval given for the input element {e}")
            return self.leaves[e]
        if e.is_Symbol:
            if e.name not in self.boxes:
                raise KeyError(f"no value for '{e.name}'; sizes must be substituted first")
            return self.boxes[e.name]
        if isinstance(e, sympy.Add):
            lo, hi = self.num(e.args[0])
            for arg in e.args[1:]:
                a_lo, a_hi = self.num(arg)
                lo, hi = lo + a_lo, hi + a_hi
            return lo, hi
        if isinstance(e, sympy.Mul):
            return self.product(e)
        if isinstance(e, sympy.Pow):
            return self.power(e)
        if isinstance(e, sympy.floor | sympy.ceiling):
            return self.rounding(e)
        if isinstance(e, sympy.Mod):
            return self.mod(*e.args)
        if isinstance(e, sympy.Min | sympy.Max):
            pick = np.minimum if isinstance(e, sympy.Min) else np.maximum
            lo, hi = self.num(e.args[0])
            for arg in e.args[1:]:
                a_lo, a_hi = self.num(arg)
                lo, hi = pick(lo, a_lo), pick(hi, a_hi)
            return lo, hi
        if isinstance(e, sympy.Abs):
            lo, hi = self.num(e.args[0])
            return (np.where(lo >= 0, lo, np.where(hi <= 0, -hi, 0)),
                    np.maximum(np.abs(lo), np.abs(hi)))
        if isinstance(e, sympy.Piecewise):
            return self.piecewise(e)
        if type(e) in _MONOTONE or isinstance(e, sigmoid):
            lo, hi = self.num(e.args[0])
            fn = _sigmoid if isinstance(e, sigmoid) else _MONOTONE[type(e)]
            return fn(np.asarray(lo, dtype=np.float64)), fn(np.asarray(hi, dtype=np.float64))
        if isinstance(e, sympy.log):
            lo, hi = self.num(e.args[0])
            with np.errstate(divide="ignore", invalid="ignore"):
                lo_v, hi_v = np.log(np.asarray(lo, np.float64)), np.log(np.asarray(hi, np.float64))
            return _nan_where(np.asarray(lo) < 0, lo_v, hi_v)
        raise TypeError(f"interval reasoning cannot bound {type(e).__name__}: {e}")

    def product(self, e: sympy.Mul):
        coeff, rest = e.as_coeff_Mul()
        if coeff != 1:
            lo, hi = self.num(rest)
            if coeff.is_Integer:
                _no_overflow(e, (lo, hi), (np.int64(int(coeff)), np.int64(int(coeff))))
            if coeff.is_Rational and not coeff.is_Integer and _is_int(lo) and _is_int(hi):
                # p/q * x as (p*x)/q: true division of exact integers, like the evaluator's
                lo, hi = _scale(lo, hi, int(coeff.p))
                return np.true_divide(lo, int(coeff.q)), np.true_divide(hi, int(coeff.q))
            return _scale(lo, hi, int(coeff) if coeff.is_Integer else float(coeff))
        lo, hi = self.num(e.args[0])
        for arg in e.args[1:]:
            a_lo, a_hi = self.num(arg)
            _no_overflow(e, (lo, hi), (a_lo, a_hi))
            corners = (lo * a_lo, lo * a_hi, hi * a_lo, hi * a_hi)
            lo, hi = _fold(np.minimum, corners), _fold(np.maximum, corners)
        return lo, hi

    def power(self, e: sympy.Pow):
        lo, hi = self.num(e.base)
        n = e.exp
        if not n.is_Number:
            raise TypeError(f"interval reasoning needs a number exponent, got {e}")
        if n.is_Integer and n >= 0:
            n = int(n)
            _no_overflow(e, *[(lo, hi)] * n)
            a, c = lo ** n, hi ** n
            if n % 2:
                return a, c
            straddle = (np.asarray(lo) < 0) & (np.asarray(hi) > 0)
            return np.where(straddle, 0, np.minimum(a, c)), np.maximum(a, c)
        lo_f, hi_f = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
        if n.is_Integer:  # negative integer: monotone on each side of 0, undefined at 0
            bad = (lo_f <= 0) & (hi_f >= 0)
        else:
            bad = lo_f < 0
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            a, c = np.power(lo_f, float(n)), np.power(hi_f, float(n))
        return _nan_where(bad, np.minimum(a, c), np.maximum(a, c))

    def rounding(self, e):
        up = isinstance(e, sympy.ceiling)
        num, den = sympy.fraction(e.args[0])
        if den != 1 and den.is_Integer and den > 0 and num.is_integer:
            lo, hi = self.num(num)
            if _is_int(lo) and _is_int(hi):
                d = int(den)
                if up:
                    return -((-lo) // d), -((-hi) // d)
                return lo // d, hi // d
        lo, hi = self.num(e.args[0])
        if _is_int(lo) and _is_int(hi):
            return lo, hi
        # the evaluator's float may round across an integer the other way: widen first
        lo, hi = _widen(lo, hi)
        fn = np.ceil if up else np.floor
        return fn(lo), fn(hi)

    def mod(self, x, m):
        lo, hi = self.num(x)
        if m.is_Number and m != 0:
            exact = m.is_Integer and _is_int(lo) and _is_int(hi)
            if not exact:
                lo, hi = _widen(lo, hi)
            m_val = int(m) if m.is_Integer else float(m)
            if exact:
                span = (0, m_val - 1) if m_val > 0 else (m_val + 1, 0)
            else:
                span = (0, m_val) if m_val > 0 else (m_val, 0)
            with np.errstate(invalid="ignore"):
                whole = (lo // m_val) == (hi // m_val)
                lo_m = np.where(whole, lo % m_val, span[0])
                hi_m = np.where(whole, hi % m_val, span[1])
            if exact:
                return lo_m, hi_m
            return _nan_where(_infinite(lo, hi), *_widen(lo_m, hi_m))
        m_lo, m_hi = self.num(m)
        m_lo, m_hi = np.asarray(m_lo, np.float64), np.asarray(m_hi, np.float64)
        # x % m lies between 0 and m (sign of m); unknown where m may be 0 or x infinite (NaN)
        unknown = (m_lo <= 0) & (m_hi >= 0) | _infinite(lo, hi) | _infinite(m_lo, m_hi)
        return _nan_where(unknown, np.minimum(m_lo, 0), np.maximum(m_hi, 0))

    def piecewise(self, e: sympy.Piecewise):
        """Like the evaluator: the last branch is the default, earlier ones override in turn."""
        lo, hi = self.num(e.args[-1].expr)
        for branch in reversed(e.args[:-1]):
            s = self.state(branch.cond)
            b_lo, b_hi = self.num(branch.expr)
            if isinstance(s, int):
                if s == ALWAYS:
                    lo, hi = b_lo, b_hi
                elif s == MAYBE:
                    lo, hi = np.minimum(lo, b_lo), np.maximum(hi, b_hi)
                continue
            lo = np.where(s == ALWAYS, b_lo, np.where(s == NEVER, lo, np.minimum(lo, b_lo)))
            hi = np.where(s == ALWAYS, b_hi, np.where(s == NEVER, hi, np.maximum(hi, b_hi)))
        return lo, hi


def _nan_source(expr) -> bool:
    """Whether ``expr`` can be NaN or infinite: it has a log, exp or non-natural power."""
    return any(isinstance(node, sympy.log | sympy.exp)
               or (isinstance(node, sympy.Pow) and not (node.exp.is_Integer and node.exp >= 0))
               for node in sympy.preorder_traversal(expr))


def _widen(lo, hi):
    """Float bounds pushed out by the rounding slack (NaN stays NaN)."""
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    with np.errstate(invalid="ignore"):
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


def _fold(fn, values):
    result = values[0]
    for v in values[1:]:
        result = fn(result, v)
    return result


def _sigmoid(x):
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def _le_state(lo, hi, always_bound, never_bound):
    """State of ``x <= 0`` for floats: ALWAYS where hi <= always_bound, NEVER where
    lo > never_bound."""
    return (np.asarray(hi <= always_bound, dtype=np.int8)
            + np.asarray(lo <= never_bound, dtype=np.int8))


def _lt_state(lo, hi, always_bound, never_bound):
    """State of ``x < 0`` for floats: ALWAYS where hi < always_bound, NEVER where lo >= never."""
    return (np.asarray(hi < always_bound, dtype=np.int8)
            + np.asarray(lo < never_bound, dtype=np.int8))


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
    left = parts[0]
    for part in parts[1:-1]:
        left = left + part
    return cmp(left, bound - parts[-1])


def _tri(always, not_never):
    """int8 state from ALWAYS and not-NEVER conditions (``always`` implies ``not_never``)."""
    if isinstance(always, bool | np.bool_) and isinstance(not_never, bool | np.bool_):
        return int(always) + int(not_never)
    return np.add(always, not_never, dtype=np.int8)


def _no_overflow(e, *factors) -> None:
    """InputError when a product of integer intervals could leave int64 (it would wrap silently)."""
    if not all(_is_int(lo) and _is_int(hi) for lo, hi in factors):
        return
    bound = 1.0
    for lo, hi in factors:
        bound *= float(max(np.abs(np.asarray(lo, np.float64)).max(initial=0),
                           np.abs(np.asarray(hi, np.float64)).max(initial=0)))
    if bound > INT_LIMIT:
        raise InputError(f"integer arithmetic in '{e}' reaches about {bound:.3g} at these sizes, "
                         f"past the {INT_LIMIT:.3g} that 64-bit integers hold exactly")


INT_LIMIT = float(2 ** 62)
