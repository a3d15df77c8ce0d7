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

Integer bounds stay within ``INT_LIMIT`` (2**62), so that int64 never wraps. An integer operation
whose operands' magnitudes could pass it (``q_idx**4`` at long sequences, a sum of large terms, a
constant past int64) is redone in float64 to find the boxes where it may: there its bounds are
the float ones widened by the rounding slack (sound for the exact integers) and the boxes are
recorded in ``Classified.overflow``, so that the plan can refuse to have a kernel evaluate the
mask there; elsewhere its exact bounds are kept. The two sides of a relation are checked too:
the evaluator computes them as written, even where their difference cancels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import sympy
from sympy.logic.boolalg import ITE

from attncc.analysis.interval_math import (
    ALWAYS,
    INT_LIMIT,
    MAYBE,
    NEVER,
    _big,
    _cleared,
    _erf_bounds,
    _floats,
    _infinite,
    _int_sum_state,
    _is_int,
    _magnitude,
    _nan_source,
    _nan_where,
    _power,
    _scale,
    _sum,
    _times,
    _tri,
    _widen,
)
from attncc.spec.numeric import logistic
from attncc.spec.symbols import (
    BIT_OPS,
    BitAnd,
    BitOr,
    LeftShift,
    Log2,
    RightShift,
    Round,
    sigmoid,
)

__all__ = ["ALWAYS", "INT_LIMIT", "MAYBE", "NEVER", "Classified", "classify", "classify_checked",
           "interval"]


_MONOTONE = {sympy.exp: np.exp, sympy.tanh: np.tanh, sympy.sign: np.sign,
             sigmoid: lambda x: logistic(x, np)}


@dataclass(frozen=True)
class Classified:
    """``states`` as ``classify`` returns them; ``overflow`` (bool, broadcasting like the states,
    or False) marks the boxes where an integer the mask computes may pass ``INT_LIMIT``, so that
    evaluating the mask there is unsafe; ``worst`` is the first such expression and its reach."""

    states: object
    overflow: object
    worst: tuple[sympy.Basic, float] | None


def classify_checked(cond: sympy.Basic, boxes: dict, leaves: dict | None = None) -> Classified:
    """``classify`` that also reports the boxes where integers may overflow."""
    with np.errstate(all="ignore"):
        engine = _Intervals(boxes, leaves or {})
        states = engine.state(cond)
    return Classified(states, engine.overflow, engine.worst)


def classify(cond: sympy.Basic, boxes: dict, leaves: dict | None = None):
    """States (NEVER/MAYBE/ALWAYS, int8 broadcast over the boxes) of condition ``cond``.

    ``boxes`` maps each symbol name in ``cond`` to its ``(lo, hi)`` bounds: arrays for the index
    symbols (``b``, ``h``, ``q_idx``, ``kv_idx``), a point ``(n, n)`` for a size. ``leaves`` maps
    each ``sympy.Indexed`` input element in ``cond`` to the ``(lo, hi)`` interval of that input over
    the box. A Python int is returned where the state is the same for every box without reading
    any box. Raises KeyError for a symbol or input element without bounds.
    """
    return classify_checked(cond, boxes, leaves).states


def interval(expr: sympy.Expr, boxes: dict, leaves: dict | None = None):
    """The ``(lo, hi)`` bounds of number ``expr`` over the boxes (see ``classify``)."""
    with np.errstate(all="ignore"):
        return _Intervals(boxes, leaves or {}).num(expr)


class _Intervals:
    """The engine; its callers run it under ``np.errstate(all="ignore")`` (bounds may be NaN or
    infinite, and so may the arithmetic of ``interval_math`` on them)."""

    def __init__(self, boxes: dict, leaves: dict):
        self.boxes = boxes
        self.leaves = leaves
        self.memo: dict = {}
        self.overflow = False
        self.worst: tuple[sympy.Basic, float] | None = None

    def ints(self, e, reach: float, exact, approx):
        """Bounds of integer node ``e``: ``exact()`` (int64) where ``reach``, a bound of ``|e|``
        over every box from its operands' magnitudes, is within INT_LIMIT. Past it, ``approx()``
        (the same in float64) finds the boxes that may leave the limit: recorded in ``overflow``,
        with the float bounds widened by the rounding slack; elsewhere the exact bounds, as
        floats."""
        if reach <= INT_LIMIT:
            try:
                return exact()
            except OverflowError:  # a coefficient past int64 met an array of zeros
                pass
        f_lo, f_hi = _widen(*approx())
        over = ~((np.abs(f_lo) <= INT_LIMIT) & (np.abs(f_hi) <= INT_LIMIT))
        try:
            lo, hi = exact()  # wraps where ``over``; those entries are replaced
        except OverflowError:  # a Python int past int64 met an array
            lo, hi, over = f_lo, f_hi, np.ones(np.shape(over), dtype=bool)
        if not np.any(over):
            return lo, hi
        self.mark(e, over, float(np.nanmax(np.maximum(np.abs(f_lo), np.abs(f_hi)))))
        lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
        return np.where(over, f_lo, lo), np.where(over, f_hi, hi)

    def mark(self, e, over, reach: float) -> None:
        self.overflow = self.overflow | over
        if self.worst is None:
            self.worst = (e, reach)

    def sized(self, e) -> tuple[float | None, float]:
        """``(bound of |e| where e is an integer else None, reach of e)``, memoized; the reach
        is a cheap bound of ``|x|`` for every integer ``x`` computed in ``e`` as written, from
        the magnitudes of the boxes and inputs alone (0 where ``e`` computes no integer)."""
        key = ("sized", e)
        if key in self.memo:
            return self.memo[key]
        kids = [self.sized(a) for a in e.args]
        mags = [m for m, _ in kids]
        m = None
        if e.is_Integer:
            m = abs(_big(int(e)))
        elif isinstance(e, sympy.Indexed) or (e.is_Symbol and e.name in self.boxes):
            lo, hi = self.leaves[e] if isinstance(e, sympy.Indexed) else self.boxes[e.name]
            m = _magnitude(lo, hi) if _is_int(lo) and _is_int(hi) else None
        elif mags and all(x is not None for x in mags):
            if isinstance(e, sympy.Add):
                m = sum(mags)
            elif isinstance(e, sympy.Mul):
                m = float(np.prod(mags))
            elif isinstance(e, sympy.Pow) and e.exp.is_Integer and e.exp >= 0:
                m = mags[0] ** int(e.exp)
            elif isinstance(e, sympy.floor | sympy.ceiling | sympy.Mod | sympy.Min | sympy.Max
                            | sympy.Abs):
                m = max(mags)
        result = (m, max([m or 0.0, *(r for _, r in kids)]))
        self.memo[key] = result
        return result

    # -- conditions --------------------------------------------------------------------------
    def state(self, e):
        if e not in self.memo:
            self.memo[e] = self._state(e)
        return self.memo[e]

    def _state(self, e):
        if e is sympy.true:
            return ALWAYS
        if e is sympy.false:
            return NEVER
        if isinstance(e, sympy.And | sympy.Or):
            pick = np.minimum if isinstance(e, sympy.And) else np.maximum
            return functools.reduce(pick, map(self.state, e.args))
        if isinstance(e, sympy.Not):
            return ALWAYS - self.state(e.args[0])
        if isinstance(e, sympy.Xor | sympy.Equivalent):  # decided only where every part is
            states = [self.state(a) for a in e.args]
            decided = functools.reduce(np.logical_and, [s != MAYBE for s in states])
            odd = functools.reduce(np.logical_xor, [s == ALWAYS for s in states])
            value = np.where(odd, ALWAYS, NEVER) if isinstance(e, sympy.Xor) else np.where(
                odd, NEVER, ALWAYS)
            return np.where(decided, value, MAYBE).astype(np.int8)
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
        sides = [s for s in (e.lhs, e.rhs) if _nan_source(s) or self.sized(s)[1] > INT_LIMIT]
        if not sides:
            return state
        unknown = functools.reduce(np.logical_or, [_infinite(*self.num(s)) for s in sides])
        return np.where(unknown, np.int8(MAYBE), state)

    def relation_of_difference(self, e: sympy.Rel):
        diff = _cleared(e.lhs - e.rhs)
        kind = type(e)
        if kind in (sympy.StrictGreaterThan, sympy.GreaterThan):
            diff = -diff
            kind = sympy.StrictLessThan if kind is sympy.StrictGreaterThan else sympy.LessThan
        terms = [self.num(a) for a in diff.args] if isinstance(diff, sympy.Add) else None
        if (terms and all(_is_int(lo) and _is_int(hi) for lo, hi in terms)
                and sum(_magnitude(lo, hi) for lo, hi in terms) <= INT_LIMIT):
            return _int_sum_state(kind, [t[0] for t in terms], [t[1] for t in terms])
        lo, hi = self.num(diff)
        if _is_int(lo) and _is_int(hi):
            return _int_sum_state(kind, [lo], [hi])
        unknown = np.isnan(lo) | np.isnan(hi)
        lo, hi = _widen(lo, hi)  # the evaluator's rounding may differ: decide past the slack
        if kind in (sympy.Equality, sympy.Unequality):
            # never ALWAYS: float equality is left to the elementwise mask
            state = np.asarray((lo <= 0) & (hi >= 0), dtype=np.int8)
            state = state if kind is sympy.Equality else ALWAYS - state
        elif kind is sympy.StrictLessThan:
            state = _tri(hi < 0, lo < 0)
        else:
            state = _tri(hi <= 0, lo <= 0)
        return np.where(unknown, np.int8(MAYBE), state)

    # -- numbers -----------------------------------------------------------------------------
    def num(self, e):
        if e not in self.memo:
            self.memo[e] = self._num(e)
        return self.memo[e]

    def _num(self, e):
        if e.is_Integer:
            v = int(e)
            if abs(v) <= INT_LIMIT:
                return v, v
            self.mark(e, True, abs(_big(v)))
            return _widen(_big(v), _big(v))
        if e.is_Number:  # -inf (a dropped score) included
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
            parts = [self.num(a) for a in e.args]
            reach = (sum(_magnitude(*p) for p in parts)
                     if all(_is_int(lo) and _is_int(hi) for lo, hi in parts) else 0.0)
            return self.ints(e, reach, lambda: _sum(parts), lambda: _sum(_floats(parts)))
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
            los, his = zip(*map(self.num, e.args), strict=True)
            return functools.reduce(pick, los), functools.reduce(pick, his)
        if isinstance(e, sympy.Abs):
            lo, hi = self.num(e.args[0])
            if _is_int(lo) and _is_int(hi) and _magnitude(lo, hi) > INT_LIMIT:
                lo, hi = self.ints(e.args[0], _magnitude(lo, hi), lambda: (lo, hi),
                                   lambda: _floats([(lo, hi)])[0])
            return (np.where(lo >= 0, lo, np.where(hi <= 0, -hi, 0)),
                    np.maximum(np.abs(lo), np.abs(hi)))
        if isinstance(e, sympy.Piecewise):
            return self.piecewise(e)
        if type(e) in _MONOTONE:
            lo, hi = self.num(e.args[0])
            fn = _MONOTONE[type(e)]
            return fn(np.asarray(lo, dtype=np.float64)), fn(np.asarray(hi, dtype=np.float64))
        if isinstance(e, sympy.erf):
            return _erf_bounds(*self.num(e.args[0]))
        if isinstance(e, sympy.Sum):  # the sum of N terms, each within the body's bounds
            (axis, lo, hi) = e.limits[0]
            count = int(hi) - int(lo) + 1
            inner = _Intervals({**self.boxes, axis.name: (int(lo), int(hi))}, self.leaves)
            b_lo, b_hi = inner.num(e.function)
            return _scale(b_lo, b_hi, count)
        if isinstance(e, Round):  # monotone; the evaluator's float may round across a half
            lo, hi = _widen(*self.num(e.args[0]))
            return np.round(lo), np.round(hi)
        if isinstance(e, sympy.sin | sympy.cos | sympy.tan):
            return self.periodic(e)
        if type(e) in BIT_OPS:
            return self.bits(e)
        if isinstance(e, sympy.log | Log2):
            lo, hi = self.num(e.args[0])
            fn = np.log if isinstance(e, sympy.log) else np.log2
            lo_v, hi_v = fn(np.asarray(lo, np.float64)), fn(np.asarray(hi, np.float64))
            return _nan_where(np.asarray(lo) < 0, lo_v, hi_v)
        raise TypeError(f"interval reasoning cannot bound {type(e).__name__}: {e}")

    def product(self, e: sympy.Mul):
        coeff, rest = e.as_coeff_Mul()
        if coeff != 1:
            lo, hi = self.num(rest)
            exact = _is_int(lo) and _is_int(hi)
            if coeff.is_Rational and exact and coeff.q <= INT_LIMIT:
                # p/q * x as (p*x)/q: true division of exact integers, like the evaluator's
                p, q = int(coeff.p), int(coeff.q)
                lo, hi = self.ints(e, _magnitude(lo, hi) * abs(_big(p)),
                                   lambda: _scale(lo, hi, p),
                                   lambda: _scale(*_floats([(lo, hi)])[0], _big(p)))
                return (lo, hi) if q == 1 else (np.true_divide(lo, q), np.true_divide(hi, q))
            return _scale(lo, hi, float(coeff))
        lo, hi = self.num(e.args[0])
        for arg in e.args[1:]:
            a_lo, a_hi = self.num(arg)
            reach = 0.0
            if all(_is_int(v) for v in (lo, hi, a_lo, a_hi)):
                reach = _magnitude(lo, hi) * _magnitude(a_lo, a_hi)
            lo, hi = self.ints(e, reach, lambda a=(lo, hi), b=(a_lo, a_hi): _times(a, b),
                               lambda a=(lo, hi), b=(a_lo, a_hi): _times(*_floats([a, b])))
        return lo, hi

    def periodic(self, e):
        """sin, cos: the endpoint values, widened to +-1 where the range holds a peak or a
        trough; tan: monotone between poles, unknown (NaN) across one."""
        lo, hi = (np.asarray(x, dtype=np.float64) for x in _widen(*self.num(e.args[0])))
        if isinstance(e, sympy.tan):
            pole = np.floor((lo + np.pi / 2) / np.pi) != np.floor((hi + np.pi / 2) / np.pi)
            return _nan_where(pole | _infinite(lo, hi), np.tan(lo), np.tan(hi))
        fn, shift = (np.sin, 0.5) if isinstance(e, sympy.sin) else (np.cos, 0.0)
        a, c = fn(lo), fn(hi)
        # peaks at (2k + shift) pi, troughs at (2k + 1 + shift) pi
        peak = np.floor(hi / (2 * np.pi) - shift / 2) >= np.ceil(lo / (2 * np.pi) - shift / 2)
        trough = (np.floor(hi / (2 * np.pi) - (1 + shift) / 2)
                  >= np.ceil(lo / (2 * np.pi) - (1 + shift) / 2))
        low = np.where(trough, -1.0, np.minimum(a, c))
        high = np.where(peak, 1.0, np.maximum(a, c))
        return _nan_where(_infinite(lo, hi), low, high)

    def bits(self, e):
        """Bit operations on non-negative integers: ``&`` within ``[0, min(hi)]``; ``| ^``
        within ``[0, 2**bits(max hi) - 1]`` (``|`` at least the larger ``lo``); shifts monotone.
        Unknown (NaN) where an operand may be negative or the result leave INT_LIMIT."""
        (a_lo, a_hi), (c_lo, c_hi) = self.num(e.args[0]), self.num(e.args[1])
        if not all(_is_int(x) for x in (a_lo, a_hi, c_lo, c_hi)):
            return _nan_where(True, 0.0, 0.0)
        negative = (np.asarray(a_lo) < 0) | (np.asarray(c_lo) < 0)
        if isinstance(e, LeftShift):
            too_big = np.log2(np.maximum(np.asarray(a_hi, np.float64), 1)) + c_hi >= 62
            if np.any(too_big | negative):
                return _nan_where(True, 0.0, 0.0)
            return np.left_shift(a_lo, c_lo), np.left_shift(a_hi, c_hi)
        if isinstance(e, RightShift):
            lo, hi = np.right_shift(a_lo, np.minimum(c_hi, 63)), np.right_shift(a_hi, c_lo)
        elif isinstance(e, BitAnd):
            lo, hi = np.zeros_like(np.minimum(a_hi, c_hi)), np.minimum(a_hi, c_hi)
        else:
            top = np.maximum(a_hi, c_hi)
            width = np.ceil(np.log2(np.asarray(top, np.float64) + 1)).astype(np.int64)
            hi = np.left_shift(np.ones_like(width), width) - 1
            lo = np.maximum(a_lo, c_lo) if isinstance(e, BitOr) else np.zeros_like(hi)
        if np.any(negative):
            return _nan_where(negative, lo, hi)
        return lo, hi

    def power(self, e: sympy.Pow):
        lo, hi = self.num(e.base)
        n = e.exp
        if not n.is_Number:  # a positive constant base (the parser's rule): monotone in n
            n_lo, n_hi = (np.asarray(x, np.float64) for x in self.num(n))
            base = float(e.base)
            a, c = np.power(base, n_lo), np.power(base, n_hi)
            return _widen(np.minimum(a, c), np.maximum(a, c))
        if n.is_Integer and n >= 0:
            n = int(n)
            if not (_is_int(lo) and _is_int(hi)):
                return _power(lo, hi, n)
            return self.ints(e, _magnitude(lo, hi) ** n, lambda: _power(lo, hi, n),
                             lambda: _power(*_floats([(lo, hi)])[0], n))
        lo_f, hi_f = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
        # a negative integer power is monotone on each side of 0, undefined at 0
        bad = ((lo_f <= 0) & (hi_f >= 0)) if n.is_Integer else lo_f < 0
        a, c = np.power(lo_f, float(n)), np.power(hi_f, float(n))
        return _nan_where(bad, np.minimum(a, c), np.maximum(a, c))

    def rounding(self, e):
        up = isinstance(e, sympy.ceiling)
        num, den = sympy.fraction(e.args[0])
        if den != 1 and den.is_Integer and 0 < den <= INT_LIMIT and num.is_integer:
            lo, hi = self.num(num)
            if _is_int(lo) and _is_int(hi):
                d = int(den)
                return (-((-lo) // d), -((-hi) // d)) if up else (lo // d, hi // d)
        lo, hi = self.num(e.args[0])
        if _is_int(lo) and _is_int(hi):
            return lo, hi
        # the evaluator's float may round across an integer the other way: widen first
        lo, hi = _widen(lo, hi)
        fn = np.ceil if up else np.floor
        return fn(lo), fn(hi)

    def mod(self, x, m):
        lo, hi = self.num(x)
        if m.is_Number and m != 0 and abs(float(m)) <= INT_LIMIT:
            exact = m.is_Integer and _is_int(lo) and _is_int(hi)
            m_val = int(m) if m.is_Integer else float(m)
            if exact:
                span = (0, m_val - 1) if m_val > 0 else (m_val + 1, 0)
            else:
                lo, hi = _widen(lo, hi)
                span = (0, m_val) if m_val > 0 else (m_val, 0)
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
