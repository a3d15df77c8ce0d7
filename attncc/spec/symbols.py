"""The sympy symbols that spec expressions are built from.

Index symbols are non-negative integers, sizes positive integers, ``score`` a real number. Every
module that reads or writes expressions takes its symbols from here, so that a symbol built by the
parser is the very object a pass or a backend looks for.
"""

from __future__ import annotations

import operator

import sympy

b = sympy.Symbol("b", integer=True, nonnegative=True)
h = sympy.Symbol("h", integer=True, nonnegative=True)
q_idx = sympy.Symbol("q_idx", integer=True, nonnegative=True)
kv_idx = sympy.Symbol("kv_idx", integer=True, nonnegative=True)
score = sympy.Symbol("score", real=True)

INDEX_SYMBOLS = {"b": b, "h": h, "q_idx": q_idx, "kv_idx": kv_idx}

SIZE_NAMES = ("batch", "heads", "kv_heads", "seq_q", "seq_k", "head_dim", "value_dim")
SIZES = {name: sympy.Symbol(name, integer=True, positive=True) for name in SIZE_NAMES}
#: The layouts of q, k and v over the sizes (every backend takes these shapes).
TENSORS = {
    "q": (SIZES["batch"], SIZES["heads"], SIZES["seq_q"], SIZES["head_dim"]),
    "k": (SIZES["batch"], SIZES["kv_heads"], SIZES["seq_k"], SIZES["head_dim"]),
    "v": (SIZES["batch"], SIZES["kv_heads"], SIZES["seq_k"], SIZES["value_dim"]),
}

#: The density of the mask: kept (query, key) pairs over all pairs; used by cost formulas.
density = sympy.Symbol("density", positive=True)


class sigmoid(sympy.Function):  # noqa: N801 - named as users write it in specs
    """The logistic function 1 / (1 + exp(-x)), kept as one node so printers can map it."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_Number:
            return 1 / (1 + sympy.exp(-x))
        return None

    def fdiff(self, argindex=1):
        return self * (1 - self)


class Round(sympy.Function):
    """``round(x)``: the nearest integer, ties to even (as NumPy and torch round)."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_Number:
            return sympy.Integer(round(float(x)))
        if x.is_integer:
            return x
        return None

    def _eval_is_integer(self):
        return self.args[0].is_real

    def fdiff(self, argindex=1):
        return sympy.Integer(0)


class Log2(sympy.Function):
    """``log2(x)``, one node (not ``log(x) * 1.4427``, so ``log2(8)`` is exactly 3)."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_Number:
            return sympy.log(x) / sympy.log(2)
        return None

    def _eval_is_real(self):
        return self.args[0].is_positive

    def fdiff(self, argindex=1):
        return 1 / (self.args[0] * sympy.log(2))


class _IntegerOp(sympy.Function):
    """A bit operation on two integers; folded when both are integer numbers."""

    nargs = 2
    op = None  # the operator on Python ints

    @classmethod
    def eval(cls, a, c):
        if a.is_Integer and c.is_Integer:
            return sympy.Integer(cls.op(int(a), int(c)))
        return None

    def _eval_is_integer(self):
        return True

    def fdiff(self, argindex=1):
        return sympy.Integer(0)


class BitAnd(_IntegerOp):
    """``a & b`` on integers."""

    op = staticmethod(operator.and_)


class BitOr(_IntegerOp):
    """``a | b`` on integers."""

    op = staticmethod(operator.or_)


class BitXor(_IntegerOp):
    """``a ^ b`` on integers."""

    op = staticmethod(operator.xor)


class LeftShift(_IntegerOp):
    """``a << b`` on integers (``b`` >= 0)."""

    op = staticmethod(operator.lshift)


class RightShift(_IntegerOp):
    """``a >> b`` on integers (``b`` >= 0), rounding toward minus infinity."""

    op = staticmethod(operator.rshift)


#: The bit operations, by the Python operator that writes them.
BIT_OPS = (BitAnd, BitOr, BitXor, LeftShift, RightShift)


def input_base(name: str, integer: bool = False) -> sympy.IndexedBase:
    """The IndexedBase standing for the runtime input ``name`` (``slope[h]`` is its element)."""
    if integer:
        return sympy.IndexedBase(name, integer=True)
    return sympy.IndexedBase(name, real=True)


def free_names(expr: sympy.Basic) -> set[str]:
    """Names of the symbols and inputs an expression reads (``slope`` for ``slope[h]``)."""
    names = {str(s) for s in expr.free_symbols if not isinstance(s, sympy.Indexed)}
    names |= {str(i.base.label) for i in expr.atoms(sympy.Indexed)}
    return {n for n in names if n}
