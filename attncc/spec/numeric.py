"""Evaluating spec expressions on arrays: sympy -> values, for any array-API namespace.

``evaluate(expr, env, xp)`` walks the expression tree and applies the namespace's elementwise
functions, broadcasting as the arrays in ``env`` do. The reference (float64 NumPy), the NumPy
backend and the torch backend all evaluate masks and score mods through this one function, so an
expression means the same everywhere. Subtrees that only read scalars are folded with Python
arithmetic.
"""

from __future__ import annotations

import functools
import math
import operator

import array_api_compat
import sympy
from sympy.logic.boolalg import ITE

from attncc.errors import InputError
from attncc.spec.symbols import (
    BitAnd,
    BitOr,
    BitXor,
    LeftShift,
    Log2,
    RightShift,
    Round,
    sigmoid,
)

_COMPARE = {
    sympy.StrictLessThan: operator.lt, sympy.LessThan: operator.le,
    sympy.StrictGreaterThan: operator.gt, sympy.GreaterThan: operator.ge,
    sympy.Equality: operator.eq, sympy.Unequality: operator.ne,
}
_UNARY = {sympy.exp: "exp", sympy.log: "log", sympy.tanh: "tanh", sympy.Abs: "abs",
          sympy.floor: "floor", sympy.ceiling: "ceil", sympy.sin: "sin", sympy.cos: "cos",
          sympy.tan: "tan", sympy.erf: "erf", sympy.sign: "sign", Round: "round",
          sigmoid: "sigmoid", Log2: "log2"}
#: n-ary nodes and integer bit operations folded pairwise: (namespace function, the same on
#: Python scalars)
_FOLDS = {BitAnd: ("bitwise_and", operator.and_), BitOr: ("bitwise_or", operator.or_),
          BitXor: ("bitwise_xor", operator.xor), LeftShift: ("bitwise_left_shift", operator.lshift),
          RightShift: ("bitwise_right_shift", operator.rshift),
          sympy.Min: ("minimum", min), sympy.Max: ("maximum", max),
          sympy.And: ("logical_and", lambda a, b: a and b),
          sympy.Or: ("logical_or", lambda a, b: a or b),
          sympy.Xor: ("not_equal", operator.ne)}
_SCALAR_UNARY = {"exp": math.exp, "log": math.log, "tanh": math.tanh, "abs": abs,
                 "floor": math.floor, "ceil": math.ceil, "sin": math.sin, "cos": math.cos,
                 "tan": math.tan, "erf": math.erf, "round": round, "log2": math.log2,
                 "sign": lambda x: float((x > 0) - (x < 0)),
                 "sigmoid": lambda x: 1.0 / (1.0 + math.exp(-x)) if x > -700 else 0.0}


_NEG_INF = sympy.S.NegativeInfinity


def logistic(x, xp):
    """``sigmoid(x) = 1 / (1 + exp(-x))`` of an array of namespace ``xp``, as
    ``exp(-log(1 + exp(-x)))``: finite, with a finite gradient, for any x. The one array recipe
    (spec functions, the reference's and the lowering's sigmoid weights)."""
    return xp.exp(-xp.logaddexp(0.0, -x))


def evaluate(expr: sympy.Basic, env: dict, xp, ranges: dict | None = None):
    """Value of ``expr`` with symbols and inputs taken from ``env`` (name -> scalar or array).

    Index symbols map to integer arrays that broadcast against each other; inputs map to arrays
    indexed by the (broadcast) index values. Raises InputError when an input is indexed out of its
    bounds, naming the input. ``ranges`` (name -> n) promises that ``env[name]`` holds integers
    in ``[0, n)``: an input axis indexed by that symbol alone, of size at least n, is read
    without a bounds check.
    """
    return _Evaluator(env, xp, ranges=ranges or {}).value(expr)


def _is_scalar(x) -> bool:
    return isinstance(x, (int, float, bool))


class _Evaluator:
    """``exact``: the evaluator of input indices, whose float arithmetic is float64 on every
    namespace (integer arrays meeting floats are promoted to float64, not torch's float32)."""

    def __init__(self, env: dict, xp, exact: bool = False, ranges: dict | None = None):
        self.env = env
        self.xp = xp
        self.exact = exact
        self.ranges = ranges or {}
        self.wide: bool | None = None  # whether integer arrays meet floats in float64
        self.memo: dict[sympy.Basic, object] = {}
        self.twin = None

    def value(self, expr):
        if expr not in self.memo:
            self.memo[expr] = self._value(expr)
        return self.memo[expr]

    def _value(self, e):
        xp = self.xp
        if e is sympy.true or e is sympy.false:
            return bool(e)
        if isinstance(e, sympy.Indexed):  # the leaves first: no number test walks them
            return self.indexed(e)
        if e.is_Symbol:
            try:
                return self.env[e.name]
            except KeyError:
                raise InputError(f"no value for '{e.name}'") from None
        if e.is_Integer:
            return int(e)
        if e is _NEG_INF:
            return -math.inf
        if e.is_Number or (isinstance(e, sympy.Expr) and e.is_number):
            return float(e)
        if isinstance(e, sympy.Add):
            return self.reduce(operator.add, operator.add, [self.value(a) for a in e.args],
                               arith=True)
        if isinstance(e, sympy.Mul):
            values = [self.value(a) for a in e.args]
            self.no_overflow(e, values)
            return self.reduce(operator.mul, operator.mul, values, arith=True)
        if isinstance(e, sympy.Pow):
            return self.power(e)
        if isinstance(e, (sympy.floor, sympy.ceiling)):  # of an integer ratio: exact
            num, den = sympy.fraction(sympy.together(e.args[0]))
            if den != 1 and num.is_integer is True and den.is_integer is True:
                num, den = self.value(num), self.value(den)
                return num // den if isinstance(e, sympy.floor) else -((-num) // den)
        if type(e) in _UNARY:
            return self.unary(_UNARY[type(e)], self.value(e.args[0]))
        if type(e) in _FOLDS:
            array_fn, scalar_fn = _FOLDS[type(e)]
            return self.reduce(getattr(xp, array_fn), scalar_fn, [self.value(a) for a in e.args])
        if isinstance(e, sympy.Sum):
            return self.reduction(e)
        if isinstance(e, sympy.Equivalent):
            return self.value(sympy.Not(sympy.Xor(*e.args)))
        if isinstance(e, sympy.Mod):
            return self.value(e.args[0]) % self.value(e.args[1])
        if type(e) in _COMPARE:
            return _COMPARE[type(e)](self.value(e.lhs), self.value(e.rhs))
        if isinstance(e, sympy.Not):
            arg = self.value(e.args[0])
            return (not arg) if _is_scalar(arg) else xp.logical_not(arg)
        if isinstance(e, sympy.Piecewise):
            return self.piecewise(e)
        if isinstance(e, sympy.Heaviside):  # d max/min/clamp: 1 above 0, H0 (1/2) at 0, 0 below
            x, at_zero = e.args[0], e.args[1] if len(e.args) > 1 else sympy.S.Half
            return self.piecewise(sympy.Piecewise((1, x > 0), (at_zero, sympy.Eq(x, 0)),
                                                  (0, True)))
        if isinstance(e, sympy.DiracDelta):  # d sign, d Heaviside: 0 wherever defined
            return 0
        if isinstance(e, ITE):  # sympy's form of a condition chosen by a condition
            return self.piecewise(sympy.Piecewise((e.args[1], e.args[0]), (e.args[2], True)))
        raise TypeError(f"attncc cannot evaluate {type(e).__name__}: {e}")

    def reduction(self, e: sympy.Sum):
        """``Sum(body, (d, 0, N-1))`` as one vectorised evaluation: ``d`` on a new leading axis,
        summed away (never N scalar terms)."""
        (axis, lo, hi), xp = e.limits[0], self.xp
        count = int(hi) - int(lo) + 1
        arrays = [x for name in ("b", "h", "q_idx", "kv_idx", "score")
                  if not _is_scalar(x := self.env.get(name, 0))]
        ndim = max((len(x.shape) for x in arrays), default=0)
        device = _device(arrays[0]) if arrays else None
        d = xp.reshape(xp.arange(int(lo), int(hi) + 1, dtype=xp.int64, device=device),
                       (count,) + (1,) * ndim)
        value = _Evaluator({**self.env, axis.name: d}, xp, self.exact,
                           {**self.ranges, axis.name: count} if int(lo) == 0 else self.ranges
                           ).value(e.function)
        if _is_scalar(value) or len(value.shape) <= ndim:  # the body does not read d
            return value * count
        return xp.sum(value, axis=0)

    def unary(self, name: str, arg):
        xp = self.xp
        if _is_scalar(arg):
            try:
                return _SCALAR_UNARY[name](arg)
            except OverflowError:
                return math.inf
            except ValueError:
                return math.nan
        if name == "sigmoid":
            return logistic(arg, xp)
        if name in ("floor", "ceil", "round") and not xp.isdtype(arg.dtype, "real floating"):
            return arg
        if name == "erf":
            return _erf(_to_float(arg, xp))
        if name == "sign":
            return xp.sign(_to_float(arg, xp))
        if name in ("sin", "cos", "tan", "log2") or (self.exact and name != "abs"):
            arg = _to_float(arg, xp)
        return getattr(xp, name)(arg)

    def power(self, e: sympy.Pow):
        base, exponent = self.value(e.base), e.exp
        if not exponent.is_Number:  # computed in floats: no integer power can wrap
            power = self.value(exponent)
            power = float(power) if _is_scalar(power) else _to_float(power, self.xp)
            return (float(base) if _is_scalar(base) else _to_float(base, self.xp)) ** power
        if _is_scalar(base):
            return base ** (int(exponent) if exponent.is_Integer else float(exponent))
        if exponent == sympy.Rational(1, 2):
            return self.xp.sqrt(_to_float(base, self.xp))
        if exponent == -sympy.Rational(1, 2):
            return 1.0 / self.xp.sqrt(_to_float(base, self.xp))
        if exponent.is_Integer and exponent >= 0:
            self.no_overflow(e, [base] * int(exponent))
            return base ** int(exponent)
        return _to_float(base, self.xp) ** float(exponent)

    def no_overflow(self, e, values) -> None:
        """InputError when a product of integer arrays could leave int64 (it would wrap)."""
        arrays = [v for v in values if not _is_scalar(v)]
        if not arrays or not all(self.xp.isdtype(v.dtype, "integral") for v in arrays):
            return
        bound = 1.0
        for v in values:
            bound *= abs(v) if _is_scalar(v) else float(self.xp.max(self.xp.abs(v)))
        if bound > 2.0 ** 62:
            raise InputError(f"integer arithmetic in '{e}' reaches about {bound:.3g} at these "
                             f"sizes, past what 64-bit integers hold exactly")

    def reduce(self, array_fn, scalar_fn, values, arith: bool = False):
        """``values`` folded pairwise: ``scalar_fn`` on two Python scalars, else ``array_fn``;
        ``arith`` (``+``, ``*``): Python scalars meet arrays as they are, but in an index
        (``exact``) an integer array meeting a Python float becomes float64 first (torch would
        compute in its float32 default, and T5's ``floor(log(...))`` buckets would round
        differently from the float64 reference), and so it does elsewhere where the environment
        holds float64 arrays (a float64 call: ``score * (1 + kv_idx / 100)``)."""
        def pair(a, b):
            if _is_scalar(a) and _is_scalar(b):
                return scalar_fn(a, b)
            if arith:
                if isinstance(a, float):
                    return array_fn(a, self.widened(b))
                if isinstance(b, float):
                    return array_fn(self.widened(a), b)
                return array_fn(a, b)
            return array_fn(*self.as_arrays(a, b))

        return functools.reduce(pair, values)

    def widened(self, x):
        """Integer array ``x`` about to meet a Python float, as float64 in an index or where the
        environment holds a float64 array; else ``x`` (float32 calls stay float32)."""
        if self.xp.isdtype(x.dtype, "real floating"):
            return x
        if self.wide is None:
            self.wide = self.exact or any(
                getattr(v, "dtype", None) is not None and not _is_scalar(v)
                and self.xp.isdtype(v.dtype, "real floating") and v.dtype == self.xp.float64
                for v in self.env.values())
        return _to_float(x, self.xp) if self.wide else x

    def as_arrays(self, a, b):
        """Both operands as arrays of one namespace (a Python scalar takes the other's dtype)."""
        xp = self.xp
        if _is_scalar(a):
            a = xp.asarray(a, dtype=_scalar_dtype(a, b, xp), device=_device(b))
        if _is_scalar(b):
            b = xp.asarray(b, dtype=_scalar_dtype(b, a, xp), device=_device(a))
        return a, b

    def piecewise(self, e: sympy.Piecewise):
        result = self.value(e.args[-1].expr)
        for branch in reversed(e.args[:-1]):
            cond, val = self.value(branch.cond), self.value(branch.expr)
            if _is_scalar(cond):
                result = val if cond else result
            else:
                val, result = self.as_arrays(val, result)
                result = self.xp.where(cond, val, result)
        return result

    def indexed(self, e: sympy.Indexed):
        name = e.base.label.name
        try:
            table = self.env[name]
        except KeyError:
            raise InputError(f"missing input '{name}'") from None
        indices = []
        if self.twin is None:  # the index evaluator, one per evaluation
            self.twin = self if self.exact else _Evaluator(self.env, self.xp, True, self.ranges)
        exact = self.twin
        for axis, index in enumerate(e.indices):
            value = exact.value(index)
            size = table.shape[axis]
            if index.is_Symbol and self.ranges.get(index.name, size + 1) <= size:
                indices.append(value)  # in range by the caller's promise
                continue
            if _is_scalar(value):
                value = math.floor(value)
                bad = not 0 <= value < size
            else:
                if self.xp.isdtype(value.dtype, "real floating"):  # integral, not provably so
                    value = self.xp.floor(value)
                value = self.xp.astype(value, self.xp.int64, copy=False)
                bad = bool(self.xp.any(value < 0) or self.xp.any(value >= size))
            if bad:
                raise InputError(f"input '{name}' is indexed outside its axis {axis} of size "
                                 f"{size} by {index}")
            indices.append(value)
        return table[tuple(indices)]


def _erf(x):
    """erf on an array: torch's own, SciPy's for NumPy when installed, else math.erf per
    element."""
    if array_api_compat.is_torch_array(x):
        return x.erf()
    try:
        from scipy.special import erf
    except ImportError:  # pragma: no cover - SciPy is optional
        import numpy as np
        return np.vectorize(math.erf, otypes=[x.dtype])(x)
    return erf(x)


def _to_float(x, xp):
    return x if xp.isdtype(x.dtype, "real floating") else xp.astype(x, xp.float64)


def _device(x):
    return getattr(x, "device", None) if not _is_scalar(x) else None


def _scalar_dtype(scalar, other, xp):
    if _is_scalar(other):
        return None
    if isinstance(scalar, bool):
        return xp.bool
    if isinstance(scalar, float) and not xp.isdtype(other.dtype, "real floating"):
        return xp.float64
    return other.dtype
