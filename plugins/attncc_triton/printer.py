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
    INDEX_SYMBOLS,
    SIZES,
    BitAnd,
    BitOr,
    BitXor,
    LeftShift,
    Log2,
    RightShift,
    Round,
    kv_idx,
    q_idx,
    score,
    sigmoid,
)

from .runtime import pow2

_BINARY = {sympy.StrictLessThan: "<", sympy.LessThan: "<=", sympy.StrictGreaterThan: ">",
           sympy.GreaterThan: ">=", sympy.Equality: "==", sympy.Unequality: "!=", BitAnd: "&",
           BitOr: "|", BitXor: "^", LeftShift: "<<", RightShift: ">>"}
_UNARY = {sympy.exp: "tl.exp", sympy.log: "tl.log", sympy.tanh: "_tanh", sympy.Abs: "tl.abs",
          sigmoid: "tl.sigmoid", sympy.sin: "tl.sin", sympy.cos: "tl.cos", sympy.tan: "_tan",
          sympy.erf: "tl.erf", Round: "_round", sympy.sign: "_sign", Log2: "tl.log2"}
_JOIN = {sympy.And: " & ", sympy.Or: " | ", sympy.Xor: " != "}
_FREE = {*INDEX_SYMBOLS.values(), *SIZES.values()}


class TritonPrinter:
    """Prints one expression; ``float_inputs`` names the inputs whose loads are cast to ACC,
    ``names`` maps subexpressions (hoisted input loads) to the variable holding them.

    A bounded ``Sum`` (``reduction``) needs statements: they collect in ``lines``, which the
    caller writes (``take``) before the line that uses the printed text."""

    def __init__(self, float_inputs: set[str], names: dict | None = None):
        self.float_inputs = set(float_inputs)
        self.names = dict(names or {})
        self.lines: list[str] = []

    def __call__(self, e) -> str:
        return self.p(e)

    def take(self) -> list[str]:
        """The statements the texts printed so far need, once."""
        lines, self.lines = self.lines, []
        return lines

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
            if isinstance(e, sympy.Abs):
                return f"tl.abs({self.bare(e.args[0])})"
            if isinstance(e, Round) and e.args[0].is_integer:
                return self.p(e.args[0])
            return f"{_UNARY[type(e)]}(({self.p(e.args[0])}).to(ACC))"
        if type(e) in _BINARY:
            return f"({self.p(e.args[0])} {_BINARY[type(e)]} {self.p(e.args[1])})"
        if isinstance(e, sympy.Heaviside):  # d max/min: 1 above 0, H0 (1/2) at 0, 0 below
            x = self.p(e.args[0])
            at_zero = self.p(e.args[1]) if len(e.args) > 1 else "0.5"
            return f"tl.where({x} > 0, 1.0, tl.where({x} == 0, {at_zero}, 0.0))"
        if isinstance(e, sympy.DiracDelta):  # d sign, d Heaviside: 0 wherever defined
            return "0.0"
        if type(e) in _JOIN:
            return "(" + _JOIN[type(e)].join(self.p(a) for a in e.args) + ")"
        if isinstance(e, sympy.Equivalent) and len(e.args) == 2:
            return f"({self.p(e.args[0])} == {self.p(e.args[1])})"
        if isinstance(e, sympy.Mod):
            a, m = e.args
            if a.is_integer and m.is_integer:
                return f"_mod({self.bare(a)}, {self.bare(m)})"
            return self.p(a - m * sympy.floor(a / m))  # floats: Triton has no float64 //
        if isinstance(e, (sympy.Min, sympy.Max)):
            fn = "tl.minimum" if isinstance(e, sympy.Min) else "tl.maximum"
            result = self.bare(e.args[0])
            for arg in e.args[1:]:
                result = f"{fn}({result}, {self.bare(arg)})"
            return result
        if isinstance(e, sympy.Not):
            return f"({self.p(e.args[0])} == 0)"
        if isinstance(e, sympy.Piecewise):
            result = self.p(e.args[-1].expr)
            for branch in reversed(e.args[:-1]):
                result = f"tl.where({self.p(branch.cond)}, {self.p(branch.expr)}, {result})"
            return result
        if isinstance(e, sympy.Sum):
            return self.reduction(e)
        raise BackendError(f"triton backend: cannot print {type(e).__name__} ({e}) as Triton code")

    def reduction(self, e: sympy.Sum) -> str:
        """``Sum(body, (d, 0, N-1))`` in a [BLOCK_M, BLOCK_N] tile (q_idx [BLOCK_M, 1], kv_idx
        [1, BLOCK_N]) over an axis of R = N padded to a power of two >= 16: a ``tl.dot`` of a
        query-side [BLOCK_M, R] and a key-side [BLOCK_N, R] tile where the body is such a
        product (``contraction``), else the body on a third axis summed by ``tl.sum``."""
        n = len(self.lines)
        axis, count = e.limits[0][0], int(e.limits[0][2]) + 1
        size = pow2(count)
        split = contraction(e)
        if split is not None:
            a, b, rest = split
            self.lines += [f"rd = tl.arange(0, {size})[None, :]",
                           f"ra{n} = tl.where(rd < {count}, {self.tile(a, axis)}, 0.0)",
                           f"rb{n} = tl.where(rd < {count}, "
                           f"{self.tile(b, axis, {kv_idx: 'tl.trans(kv_idx)'})}, 0.0)",
                           f"red{n} = tl.dot(ra{n}, tl.trans(rb{n}), out_dtype=ACC, "
                           "input_precision=PREC)"]
            return f"red{n}" if rest == 1 else f"(red{n} * {self.p(rest)})"
        body = self.cube(axis).p(e.function)
        self.lines += [f"rd3 = tl.arange(0, {size})[None, None, :]",
                       f"red{n} = tl.sum(tl.where(rd3 < {count}, {body}, 0.0), 2)"]
        return f"red{n}"

    def scatter(self, atom: sympy.Indexed, total: sympy.Sum, outer: str) -> list[str]:
        """Lines adding to ``{x}_grad`` the gradient of input element ``atom`` on the axis of
        ``total``, from ``outer``, the [BLOCK_M, BLOCK_N] tile of dL / d total (0 where not
        kept): ``tl.dot`` of it with the other tile of a contraction, else over a third axis."""
        name, n = str(atom.base.label), len(self.lines)
        axis, count = total.limits[0][0], int(total.limits[0][2]) + 1
        size = pow2(count)
        split = contraction(total)
        if split is not None and atom in split[:2]:
            a, b, rest = split
            g = outer if rest == 1 else f"g{n}"
            key = {kv_idx: "tl.trans(kv_idx)"}
            other, grad, at = ((b, g, TritonPrinter(set(), {axis: "rd"}).offset(a))
                               if atom == a else (a, f"tl.trans({g})", TritonPrinter(
                                   set(), {axis: "rd", **key}).offset(b)))
            return [*self.take(), f"rd = tl.arange(0, {size})[None, :]",
                    *([] if rest == 1 else [f"{g} = {outer} * ({self.bare(rest)})"]),
                    f"ro{n} = tl.where(rd < {count}, "
                    f"{self.tile(other, axis, key if other == b else None)}, 0.0)",
                    f"tl.atomic_add({name}_grad + {at}, tl.dot({grad}, ro{n}, out_dtype=ACC, "
                    f"input_precision=PREC), mask=rd < {count})"]
        cube = self.cube(axis)
        body = cube.p(partial(total.function, atom))
        return [*self.take(), f"rd3 = tl.arange(0, {size})[None, None, :]",
                f"g{n} = tl.where(rd3 < {count}, ({outer})[:, :, None] * {body}, 0.0)",
                f"tl.atomic_add({name}_grad + {cube.offset(atom)} + 0 * (q_idx[:, :, None] + "
                f"kv_idx[:, :, None] + rd3), g{n}, mask=rd3 < {count})"]

    def tile(self, atom: sympy.Indexed, axis, names=None) -> str:
        """The load of ``atom`` with ``axis`` on a second tile axis, in ACC."""
        text = TritonPrinter(self.float_inputs, {axis: "rd", **(names or {})}).load(atom)
        return text if text.endswith(".to(ACC)") else f"{text}.to(ACC)"

    def cube(self, axis) -> TritonPrinter:
        """A printer of a [BLOCK_M, BLOCK_N, R] body: the tile's names on a third axis ``rd3``
        (input elements that vary over the tile are loaded again, at 3-d indices)."""
        names = {e: name for e, name in self.names.items()
                 if isinstance(e, sympy.Indexed) and not reads(e, {q_idx, kv_idx})}
        return TritonPrinter(self.float_inputs, {
            **names, axis: "rd3", q_idx: "q_idx[:, :, None]", kv_idx: "kv_idx[:, :, None]",
            score: "score[:, :, None]"})

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


def reads(atom: sympy.Indexed, symbols) -> bool:
    """Whether the indices of input element ``atom`` read any of ``symbols``."""
    return bool(sympy.Tuple(*atom.indices).free_symbols & set(symbols))


def summed(atom: sympy.Indexed) -> bool:
    """Whether ``atom`` reads a reduction's axis (a symbol that is no index or size)."""
    return not sympy.Tuple(*atom.indices).free_symbols <= _FREE


def contraction(e: sympy.Sum):
    """``(a, b, rest)`` where the body of ``e`` is ``rest * a * b``: ``a`` an input element on
    the axis that reads q_idx (not kv_idx), ``b`` one that reads kv_idx (not q_idx), ``rest``
    free of the axis; None for any other body."""
    axis = e.limits[0][0]
    on_axis = [f for f in sympy.Mul.make_args(e.function) if f.has(axis)]
    if len(on_axis) != 2 or not all(isinstance(f, sympy.Indexed) for f in on_axis):
        return None
    a, b = sorted(on_axis, key=lambda f: reads(f, {kv_idx}))
    if not (reads(a, {q_idx}) and not reads(a, {kv_idx}) and reads(b, {kv_idx})
            and not reads(b, {q_idx})):
        return None
    return a, b, e.function / (a * b)


def input_atoms(expr) -> list[sympy.Indexed]:
    """The input elements an expression reads, in a stable order."""
    if expr is None:
        return []
    return sorted(expr.atoms(sympy.Indexed), key=sympy.default_sort_key)


def derivatives(expr, x, float_inputs: set[str]) -> tuple[sympy.Expr, list, list]:
    """``(d expr / d x, [(atom, d expr / d atom)], [(atom, reduction, d expr / d reduction)])``
    for the floating input elements: first those outside any reduction's axis (whose
    derivatives may hold reductions), then those on a reduction's axis, whose gradient is
    ``d expr / d reduction`` times the body's per axis element (``TritonPrinter.scatter``); in
    forms the printer prints (``printable``)."""
    plain = [(a, partial(expr, a)) for a in input_atoms(expr)
             if str(a.base.label) in float_inputs and not summed(a)]
    on_axis = [(a, total, partial(expr, total)) for total in expr.atoms(sympy.Sum)
               for a in input_atoms(total.function)
               if str(a.base.label) in float_inputs and summed(a)]
    return printable(sympy.diff(expr, x), x), plain, on_axis


def partial(expr, x):
    """``d expr / d x`` for a subexpression ``x`` (an input element, a reduction), printable."""
    dummy = sympy.Dummy("x", real=True)
    return printable(sympy.diff(expr.xreplace({x: dummy}), dummy), dummy).xreplace({dummy: x})


def printable(derivative, x):
    """A derivative sympy left unevaluated, rewritten: d floor, d ceiling, d round, d sign and
    bit operations are 0 almost everywhere (as torch's autograd says); d (a mod m) is d a - d m
    * floor(a / m) (``a mod m = a - m * floor(a / m)``); the chain rule's ``Subs(d f(ξ), ξ,
    g)`` (``d floor(3 * score)``) is evaluated once its derivative is rewritten."""
    def rewrite(d):
        inner, (var, *_) = d.expr, d.variables
        if isinstance(inner, sympy.Mod):
            a, m = inner.args
            return printable(sympy.diff(a, var) - sympy.diff(m, var) * sympy.floor(a / m), var)
        if isinstance(inner, sympy.floor | sympy.ceiling | sympy.sign | Round | BitAnd | BitOr
                      | BitXor | LeftShift | RightShift):
            return sympy.Integer(0)
        raise BackendError(f"triton backend: cannot differentiate {inner} for the backward")

    rewritten = derivative.replace(lambda e: isinstance(e, sympy.Derivative), rewrite)
    return rewritten.replace(lambda e: isinstance(e, sympy.Subs), lambda e: e.doit())
