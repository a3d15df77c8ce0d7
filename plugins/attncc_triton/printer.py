"""sympy -> Triton expression printer: score_mod and mask become inline Triton code.

The printed code means what ``attncc.spec.numeric.evaluate`` computes: ``//`` and ``%`` on integers
round toward minus infinity (through the ``_floordiv``/``_mod`` helpers, correct whichever way the
hardware truncates), ``Piecewise`` is ``tl.where``, ``And``/``Or``/``Not`` are ``&``/``|``/``== 0``,
and an input element ``x[i, j]`` is ``tl.load(x_ptr + i * x_s0 + j * x_s1)`` with each index clamped
into ``[0, x_n0)`` (``_clamp``): an index past the input never faults (it reads the nearest
element; positions outside the sequences, in partial tiles, are dropped by ``keep``).

Names in the printed code: ``score``, ``b``, ``h``, ``q_idx``, ``kv_idx``, the sizes (``seq_k``...)
as kernel arguments, ``ACC`` (the accumulation dtype, a constexpr), and per input ``x``: ``x_ptr``,
``x_s0...`` (strides), ``x_n0...`` (sizes).
"""

from __future__ import annotations

import sympy

from attncc.errors import BackendError
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

_COMPARE = {sympy.StrictLessThan: "<", sympy.LessThan: "<=", sympy.StrictGreaterThan: ">",
            sympy.GreaterThan: ">=", sympy.Equality: "==", sympy.Unequality: "!="}
_UNARY = {sympy.exp: "tl.exp", sympy.log: "tl.log", sympy.tanh: "_tanh", sympy.Abs: "tl.abs",
          sigmoid: "tl.sigmoid", sympy.sin: "tl.sin", sympy.cos: "tl.cos", sympy.tan: "_tan",
          sympy.erf: "tl.erf", Round: "_round", sympy.sign: "_sign", Log2: "tl.log2"}
_BITS = {BitAnd: "&", BitOr: "|", BitXor: "^", LeftShift: "<<", RightShift: ">>"}


class TritonPrinter:
    """Prints one expression; ``float_inputs`` names the inputs whose loads are cast to ACC,
    ``names`` maps subexpressions (hoisted input loads) to the variable holding them."""

    def __init__(self, float_inputs: set[str], names: dict | None = None):
        self.float_inputs = set(float_inputs)
        self.names = dict(names or {})

    def __call__(self, e) -> str:
        return self.p(e)

    def p(self, e) -> str:
        if e is sympy.true or e is sympy.false:
            return "True" if e is sympy.true else "False"
        if e.is_Integer:
            return f"({int(e)})" if e < 0 else str(int(e))
        if e is sympy.S.NegativeInfinity:
            return 'float("-inf")'

        if e.is_Number or (isinstance(e, sympy.Expr) and e.is_number):
            return f"({float(e)!r})" if e < 0 else repr(float(e))
        if e in self.names:
            return self.names[e]
        if isinstance(e, sympy.Indexed):
            return self.load(e)
        if e.is_Symbol:
            return e.name
        if isinstance(e, sympy.Add):
            return self.add(e)
        if isinstance(e, sympy.Mul):
            return self.mul(e)
        if isinstance(e, sympy.Pow):
            return self.power(e)
        if isinstance(e, (sympy.floor, sympy.ceiling)):
            return self.rounding(e)
        if type(e) in _UNARY:
            arg = self.p(e.args[0])
            if isinstance(e, sympy.Abs):
                return f"tl.abs({self.bare(e.args[0])})"
            if isinstance(e, Round) and e.args[0].is_integer:
                return arg
            return f"{_UNARY[type(e)]}(({arg}).to(ACC))"
        if type(e) in _BITS:
            return f"({self.p(e.args[0])} {_BITS[type(e)]} {self.p(e.args[1])})"
        if isinstance(e, sympy.Heaviside):  # d max/min: 1 above 0, H0 (1/2) at 0, 0 below
            x = self.p(e.args[0])
            at_zero = self.p(e.args[1]) if len(e.args) > 1 else "0.5"
            return f"tl.where({x} > 0, 1.0, tl.where({x} == 0, {at_zero}, 0.0))"
        if isinstance(e, sympy.DiracDelta):  # d sign, d Heaviside: 0 wherever defined
            return "0.0"
        if isinstance(e, sympy.Xor):
            return "(" + " != ".join(self.p(a) for a in e.args) + ")"
        if isinstance(e, sympy.Equivalent) and len(e.args) == 2:
            return f"({self.p(e.args[0])} == {self.p(e.args[1])})"
        if isinstance(e, sympy.Mod):
            return f"_mod({self.bare(e.args[0])}, {self.bare(e.args[1])})"
        if isinstance(e, (sympy.Min, sympy.Max)):
            fn = "tl.minimum" if isinstance(e, sympy.Min) else "tl.maximum"
            result = self.bare(e.args[0])
            for arg in e.args[1:]:
                result = f"{fn}({result}, {self.bare(arg)})"
            return result
        if type(e) in _COMPARE:
            return f"({self.p(e.lhs)} {_COMPARE[type(e)]} {self.p(e.rhs)})"
        if isinstance(e, sympy.And):
            return "(" + " & ".join(self.p(a) for a in e.args) + ")"
        if isinstance(e, sympy.Or):
            return "(" + " | ".join(self.p(a) for a in e.args) + ")"
        if isinstance(e, sympy.Not):
            return f"({self.p(e.args[0])} == 0)"
        if isinstance(e, sympy.Piecewise):
            result = self.p(e.args[-1].expr)
            for branch in reversed(e.args[:-1]):
                result = f"tl.where({self.p(branch.cond)}, {self.p(branch.expr)}, {result})"
            return result
        if isinstance(e, sympy.Sum):
            raise BackendError("triton backend: a sum(... for d in range(N)) reduction is not "
                               "printed as Triton code yet; use the numpy or torch backend")
        raise BackendError(f"triton backend: cannot print {type(e).__name__} ({e}) as Triton code")

    def bare(self, e) -> str:
        """``e`` printed without the parentheses that enclose all of it (a call's argument)."""
        text = self.p(e)
        return text[1:-1] if enclosed(text) else text

    def add(self, e: sympy.Add) -> str:
        """``a - b`` for a negative term, a positive term first where there is one."""
        terms = sorted(e.args, key=lambda t: (t.could_extract_minus_sign(),
                                              sympy.default_sort_key(t)))
        text = self.p(terms[0])
        for t in terms[1:]:
            text += f" - {self.p(-t)}" if t.could_extract_minus_sign() else f" + {self.p(t)}"
        return f"({text})"

    def mul(self, e: sympy.Mul) -> str:
        if e.could_extract_minus_sign():
            return f"(-{self.p(-e)})"
        num, den = sympy.fraction(e)
        if den != 1 and num.is_integer and den.is_integer:  # true division in ACC
            top = repr(float(num)) if num.is_Integer else f"({self.p(num)}).to(ACC)"
            return f"({top} / ({self.p(den)}))"
        return " * ".join(self.p(a) for a in e.args)

    def power(self, e: sympy.Pow) -> str:
        base, exp = self.p(e.base), e.exp
        if exp.is_Integer and 0 <= int(exp) <= 8:
            return "(" + " * ".join([base] * int(exp)) + ")" if int(exp) else "(1)"
        if exp.is_Integer and -8 <= int(exp) < 0:
            return "(1.0 / (" + " * ".join([base] * -int(exp)) + "))"
        if exp == sympy.Rational(1, 2):
            return f"tl.sqrt(({base}).to(ACC))"
        if exp == -sympy.Rational(1, 2):
            return f"(1.0 / tl.sqrt(({base}).to(ACC)))"
        if e.base.is_Number:  # a positive constant base (the parser's rule for x ** y)
            return f"tl.exp(({self.p(exp)}) * {float(sympy.log(e.base))!r})"
        # a general power of a positive base
        return f"tl.exp(({self.p(exp)}) * tl.log(({base}).to(ACC)))"

    def rounding(self, e) -> str:
        num, den = sympy.fraction(sympy.together(e.args[0]))
        if den != 1 and num.is_integer and den.is_integer:
            n, d = self.bare(num), self.bare(den)
            if isinstance(e, sympy.floor):
                return f"_floordiv({n}, {d})"
            return f"(-_floordiv(-({n}), {d}))"
        fn = "tl.floor" if isinstance(e, sympy.floor) else "tl.ceil"
        if e.args[0].is_integer:
            return self.p(e.args[0])
        return f"{fn}(({self.p(e.args[0])}).to(ACC))"

    def offset(self, e: sympy.Indexed) -> str:
        """The element offset of input element ``e``, every index clamped to its axis."""
        name = str(e.base.label)
        parts = []
        for axis, index in enumerate(e.indices):
            i = self.p(index)
            if index.is_integer is not True:  # integral, not provably so: rounded down
                i = f"tl.floor(({i}).to(ACC)).to(tl.int32)"
            elif index.has(sympy.floor, sympy.ceiling, Round):  # tl.floor gives a float
                i = f"({i}).to(tl.int32)"
            if index.is_Integer:
                parts.append(f"{i} * {name}_s{axis}")
            else:
                parts.append(f"_clamp({i}, {name}_n{axis}) * {name}_s{axis}")
        return " + ".join(parts)

    def load(self, e: sympy.Indexed) -> str:
        name = str(e.base.label)
        value = f"tl.load({name}_ptr + {self.offset(e)})"
        return f"{value}.to(ACC)" if name in self.float_inputs else value


def enclosed(text: str) -> bool:
    """Whether one pair of parentheses encloses all of ``text``."""
    depth = 0
    for i, c in enumerate(text):
        depth += (c == "(") - (c == ")")
        if depth == 0 and i < len(text) - 1:
            return False
    return text.startswith("(")


def input_atoms(expr) -> list[sympy.Indexed]:
    """The input elements an expression reads, in a stable order."""
    if expr is None:
        return []
    return sorted(expr.atoms(sympy.Indexed), key=sympy.default_sort_key)


def derivatives(expr, score, float_inputs: set[str]) -> tuple[sympy.Expr, list]:
    """``(d expr / d score, [(atom, d expr / d atom)])`` for the floating input atoms, in forms
    the printer prints (``printable``)."""
    d_score = printable(sympy.diff(expr, score), score)
    result = []
    for atom in input_atoms(expr):
        if str(atom.base.label) not in float_inputs:
            continue
        dummy = sympy.Dummy("x", real=True)
        d_atom = printable(sympy.diff(expr.xreplace({atom: dummy}), dummy), dummy)
        result.append((atom, d_atom.xreplace({dummy: atom})))
    return d_score, result


def printable(derivative, x):
    """A derivative sympy left unevaluated, rewritten: d floor, d ceiling, d round, d sign and
    bit operations are 0 almost everywhere (as torch's autograd says); d (a mod m) is d a - d m
    * floor(a / m) (``a mod m = a - m * floor(a / m)``)."""
    def rewrite(d):
        inner = d.expr
        if isinstance(inner, sympy.Mod):
            a, m = inner.args
            return printable(sympy.diff(a, x) - sympy.diff(m, x) * sympy.floor(a / m), x)
        if isinstance(inner, sympy.floor | sympy.ceiling | sympy.sign | Round | BitAnd | BitOr
                      | BitXor | LeftShift | RightShift):
            return sympy.Integer(0)
        raise BackendError(f"triton backend: cannot differentiate {inner} for the backward")

    return derivative.replace(lambda e: isinstance(e, sympy.Derivative), rewrite)
