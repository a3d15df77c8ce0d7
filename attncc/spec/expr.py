"""The safe expression parser: spec text -> sympy, through a whitelist of Python ``ast`` nodes.

Nothing is ever evaluated: the text is parsed by ``ast.parse`` and every node is checked against
the grammar below before a sympy object is built from it directly (no ``eval``, no
``sympy.parse_expr``, which evals). Limits on length, nesting, node count and exponents bound the
work any input can cause.

Grammar: numbers, ``True``/``False``, names from the scope (a 0-d input by its name),
``input[i, ...]`` (or ``input[i][j]``) for declared inputs, ``+ - * / // % **``, comparisons
(chained too; ``==``/``!=`` also between conditions), ``and or not``, ``& | ^ ~`` (logical on
conditions, bitwise on integers), ``<< >>`` on integers, ``x if c else y``, the functions in
``FUNCTIONS``, and ``-inf`` where the scope allows it (a score_mod's value: the pair is dropped).
"""

from __future__ import annotations

import ast
import dataclasses
import math
import operator
from dataclasses import dataclass, field

import sympy
from sympy.functions.elementary.piecewise import ExprCondPair
from sympy.logic.boolalg import Boolean

from attncc.errors import SpecError
from attncc.spec.symbols import (
    BitAnd,
    BitOr,
    BitXor,
    LeftShift,
    Log2,
    RightShift,
    Round,
    input_base,
    sigmoid,
)

MAX_LENGTH = 4096
MAX_DEPTH = 64
MAX_NODES = 1024
MAX_EXPONENT = 64
MAX_POWER_DIGITS = 300
MAX_SHIFT = 62
MAX_REDUCTION = 4096
_WHITESPACE = str.maketrans("\t\n\r\f\v", "     ")

#: function name -> (arity: exact int, or None for 2 or more)
FUNCTIONS = {
    "sqrt": 1, "exp": 1, "log": 1, "tanh": 1, "sigmoid": 1, "abs": 1, "floor": 1, "ceil": 1,
    "min": None, "max": None, "where": 3, "sin": 1, "cos": 1, "tan": 1, "erf": 1, "exp2": 1,
    "log2": 1, "pow": 2, "clamp": 3, "silu": 1, "gelu": 1, "gelu_tanh": 1, "sign": 1,
    "round": 1, "sum": 1, "dot": 2,
}
_SQRT_2_OVER_PI = sympy.Float(math.sqrt(2.0 / math.pi))
_SYMPY_FUNCS = {
    "sqrt": sympy.sqrt, "exp": sympy.exp, "log": sympy.log, "tanh": sympy.tanh,
    "sigmoid": sigmoid, "abs": sympy.Abs, "floor": sympy.floor, "ceil": sympy.ceiling,
    "min": sympy.Min, "max": sympy.Max, "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan,
    "erf": sympy.erf, "log2": Log2,
    "clamp": lambda x, lo, hi: sympy.Min(sympy.Max(x, lo), hi),
    "silu": lambda x: x * sigmoid(x),
    "gelu": lambda x: x * (1 + sympy.erf(x / sympy.Float(math.sqrt(2.0)))) / 2,
    "gelu_tanh": lambda x: x * (1 + sympy.tanh(_SQRT_2_OVER_PI * (x + sympy.Float(0.044715)
                                                                  * x ** 3))) / 2,
    "sign": sympy.sign, "round": Round,
}
_BITS = {ast.BitAnd: BitAnd, ast.BitOr: BitOr, ast.BitXor: BitXor, ast.LShift: LeftShift,
         ast.RShift: RightShift}
_LOGIC = {ast.BitAnd: sympy.And, ast.BitOr: sympy.Or, ast.BitXor: sympy.Xor}
_COMPARE = {
    ast.Lt: sympy.Lt, ast.LtE: sympy.Le, ast.Gt: sympy.Gt, ast.GtE: sympy.Ge,
    ast.Eq: sympy.Eq, ast.NotEq: sympy.Ne,
}
_COMPARE_CONDITIONS = {ast.Eq: sympy.Equivalent, ast.NotEq: sympy.Xor}
_ARITHMETIC = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: lambda a, b: sympy.floor(a / b), ast.Mod: sympy.Mod,
}
_OP_TEXT = {
    ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%",
    ast.Pow: "**", ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^", ast.LShift: "<<",
    ast.RShift: ">>", ast.MatMult: "@",
}
_FORBIDDEN = {
    ast.Attribute: "attribute access", ast.Lambda: "a lambda", ast.ListComp: "a comprehension",
    ast.SetComp: "a comprehension", ast.DictComp: "a comprehension",
    ast.GeneratorExp: "a comprehension", ast.JoinedStr: "an f-string", ast.Starred: "a starred",
    ast.NamedExpr: "an assignment expression", ast.Await: "await", ast.Yield: "yield",
    ast.YieldFrom: "yield", ast.List: "a list", ast.Dict: "a dict", ast.Set: "a set",
    ast.Slice: "a slice",
}


@dataclass(frozen=True)
class Scope:
    """What an expression may name.

    ``names`` maps a bare name to the sympy object it stands for (index and size symbols, constant
    values); ``inputs`` maps an input name to ``(ndim, integer)``, where ``integer`` says whether
    its elements are integers (so may index other inputs); a 0-d input (``ndim`` 0) is read by
    its bare name and stands for ``name[0]`` (bind views it as one element). ``booleans`` names
    the inputs of dtype bool: an element of one, used where a condition is expected, means
    ``element != 0``. ``infinite`` allows the name ``inf``; the result may then be ``-inf``
    (only as the whole value, a ``where`` branch, a term of a sum, or an argument of min/max).
    ``reductions`` allows ``sum(x for d in range(N))`` (a ``sympy.Sum`` over ``d = 0..N-1``)
    and ``dot(x[...], y[...])`` (the same Sum over the inputs' trailing axis, whose sizes
    ``trailing`` gives: input name -> the size of its last axis, spec-fixed sizes substituted).
    """

    names: dict[str, sympy.Basic] = field(default_factory=dict)
    inputs: dict[str, tuple[int, bool]] = field(default_factory=dict)
    booleans: frozenset[str] = frozenset()
    infinite: bool = False
    reductions: bool = False
    trailing: dict[str, sympy.Expr] = field(default_factory=dict)


def parse_expr(text, scope: Scope, *, field: str, file: str | None = None,
               want: str = "number") -> sympy.Basic:
    """Parse ``text`` into a sympy expression; ``want`` is ``"number"``, ``"bool"`` or ``"any"``.

    Raises SpecError naming ``file``, ``field`` and the 1-based column on any input outside the
    grammar, past a limit, or of the wrong kind (a condition where a number is wanted, or back).
    """
    if isinstance(text, bool):
        return sympy.true if text else sympy.false
    if isinstance(text, (int, float)):
        text = repr(text)
    if not isinstance(text, str):
        raise SpecError(f"expected an expression (text or a number), got {type(text).__name__}",
                        file=file, field=field)
    # Each whitespace character becomes one space, so columns still count in the user's text;
    # leading spaces are cut (ast.parse refuses them) and added back to every column.
    flat = text.translate(_WHITESPACE)
    source = flat.strip()
    shift = len(flat) - len(flat.lstrip())
    if not source:
        raise SpecError("expected an expression, got empty text", file=file, field=field)
    if len(source) > MAX_LENGTH:
        raise SpecError(f"expression is {len(source)} characters long; at most {MAX_LENGTH} "
                        "are allowed", file=file, field=field)
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as err:
        # Python reports offset 0 (or none) when the text ends too early: point past its end.
        column = (err.offset if err.offset and err.offset >= 1 else len(source) + 1) + shift
        raise SpecError(f"not a valid expression: {err.msg}", file=file, field=field,
                        column=column) from None
    except (MemoryError, RecursionError) as err:
        raise SpecError(f"expression too complex to parse ({type(err).__name__})",
                        file=file, field=field) from None
    _check_size(tree.body, file, field, shift)
    builder = _Builder(scope, file, field, shift)
    result = builder.build(tree.body)
    if want == "bool":
        result = builder.as_condition(result)
    builder.check_kind(result, want, tree.body)
    if scope.infinite:
        builder.check_infinity(result, tree.body)
    return result


def _check_size(root: ast.AST, file, field, shift: int) -> None:
    """Reject trees deeper than MAX_DEPTH or larger than MAX_NODES, iteratively (no recursion).

    Operator nodes carry no position; an error there points at the nearest positioned ancestor.
    """
    stack = [(root, 1, root.col_offset)]
    count = 0
    while stack:
        node, depth, col = stack.pop()
        count += 1
        if depth > MAX_DEPTH:
            raise SpecError(f"expression nests deeper than {MAX_DEPTH} levels", file=file,
                            field=field, column=col + 1 + shift)
        if count > MAX_NODES:
            raise SpecError(f"expression has more than {MAX_NODES} parts", file=file, field=field)
        stack.extend((child, depth + 1, getattr(child, "col_offset", col))
                     for child in ast.iter_child_nodes(node))


def _is_bool(expr) -> bool:
    return isinstance(expr, Boolean) and not isinstance(expr, sympy.Expr)


class _Builder:
    """Builds sympy objects from a size-checked ``ast`` tree, one whitelisted node at a time."""

    def __init__(self, scope: Scope, file, field, shift: int):
        self.scope = scope
        self.file = file
        self.field = field
        self.shift = shift  # the leading spaces cut from the text, added back to every column

    def fail(self, node: ast.AST, message: str):
        raise SpecError(message, file=self.file, field=self.field,
                        column=getattr(node, "col_offset", -1) + 1 + self.shift)

    def check_kind(self, expr, want: str, node: ast.AST) -> None:
        """The whole expression is of the kind ``want`` (number, bool, or any)."""
        if want == "bool" and not _is_bool(expr):
            self.fail(node, f"expected a condition (true or false), got the number {expr}")
        if want == "number" and _is_bool(expr):
            self.fail(node, f"expected a number, got the condition {expr}")

    def check_infinity(self, expr, node: ast.AST) -> None:
        """``-inf`` only where it means "drop the pair"; ``+inf`` nowhere."""
        if expr.has(sympy.oo):
            self.fail(node, "expression can be +inf; only -inf (a dropped pair) is allowed")
        allowed = (sympy.Piecewise, ExprCondPair, sympy.Add, sympy.Min, sympy.Max)
        stack = [expr]
        while stack:
            e = stack.pop()
            for arg in e.args:
                if arg is sympy.S.NegativeInfinity and not isinstance(e, allowed):
                    self.fail(node, "-inf is allowed only as a score's value (where(c, score, "
                                    f"-inf), score - inf), not inside {e}")
                stack.append(arg)

    def number(self, node: ast.AST):
        value = self.build(node)
        if _is_bool(value):
            self.fail(node, f"expected a number here, got the condition {value}")
        return value

    def as_condition(self, value):
        """An element of a bool input stands for the condition ``element != 0``."""
        if isinstance(value, sympy.Indexed) and str(value.base.label) in self.scope.booleans:
            return sympy.Ne(value, 0)
        return value

    def condition(self, node: ast.AST):
        value = self.as_condition(self.build(node))
        if not _is_bool(value):
            self.fail(node, f"expected a condition here, got the number {value}")
        return value

    def build(self, node: ast.AST):
        method = getattr(self, f"_{type(node).__name__}", None)
        if method is None:
            what = _FORBIDDEN.get(type(node), type(node).__name__)
            self.fail(node, f"{what} is not allowed in an expression")
        try:
            result = method(node)
        except SpecError:
            raise
        except (TypeError, ValueError, ZeroDivisionError, OverflowError, AttributeError) as err:
            self.fail(node, f"cannot build this part: {err}")
        if result.has(sympy.I):
            self.fail(node, "expression is not a real number (it takes the root or log of a "
                            "negative value)")
        if result.has(sympy.zoo, sympy.nan) or (
                not self.scope.infinite and result.has(sympy.oo, -sympy.oo)):
            self.fail(node, "expression divides by zero or is not finite")
        if isinstance(result, sympy.Expr) and result.is_number and not result.is_Number:
            # exp(1), sqrt(2): constants that are not plain numbers (sympy.E, a Pow) become
            # Floats, so that evaluators and interval reasoning only ever meet plain numbers.
            result = sympy.Float(result.evalf())
        return result

    def _Constant(self, node: ast.Constant):
        value = node.value
        if isinstance(value, bool):
            return sympy.true if value else sympy.false
        if isinstance(value, int):
            return sympy.Integer(value)
        if isinstance(value, float):
            if not math.isfinite(value):
                self.fail(node, "numbers must be finite")
            return sympy.Float(value)
        self.fail(node, f"expected a number, got the {type(value).__name__} {value!r}")

    def _Name(self, node: ast.Name):
        if node.id in self.scope.names:
            return self.scope.names[node.id]
        if self.scope.infinite and node.id == "inf":
            return sympy.oo
        if node.id in self.scope.inputs:
            ndim, integer = self.scope.inputs[node.id]
            if ndim == 0:
                return input_base(node.id, integer=integer)[sympy.Integer(0)]
            self.fail(node, f"input '{node.id}' must be indexed, as {node.id}[...]")
        if node.id in FUNCTIONS:
            self.fail(node, f"'{node.id}' is a function; call it as {node.id}(...)")
        allowed = ", ".join(sorted(self.scope.names) + sorted(self.scope.inputs))
        self.fail(node, f"unknown name '{node.id}'; expected one of: {allowed}")

    def _Subscript(self, node: ast.Subscript, axis=None):
        """``x[i, j]``, or chained ``x[i][j]`` (the same element); ``axis`` (a read in
        ``dot``): one index fewer, ``axis`` last. An index that is not provably an integer
        (``floor(log(...))`` inside a ``where``) is rounded down when evaluated; one that is
        provably not an integer is refused."""
        chain = []
        while isinstance(node.value, ast.Subscript):
            chain.append(node)
            node = node.value
        chain.append(node)
        if not isinstance(node.value, ast.Name) or node.value.id not in self.scope.inputs:
            inputs = ", ".join(sorted(self.scope.inputs)) or "none declared"
            self.fail(node, f"only inputs can be indexed (inputs: {inputs})")
        name = node.value.id
        ndim, integer = self.scope.inputs[name]
        parts = [p for link in reversed(chain)
                 for p in (link.slice.elts if isinstance(link.slice, ast.Tuple) else [link.slice])]
        if axis is not None and len(parts) != ndim - 1:
            self.fail(node, f"dot() reads '{name}' ({ndim} dimensions) with {ndim - 1} "
                            f"index(es), leaving its trailing axis to contract; got {len(parts)}")
        if axis is None and len(parts) != ndim:
            self.fail(node, f"input '{name}' has {ndim} dimension(s); got {len(parts)} index(es)")
        indices = []
        for part in parts:
            index = self.number(part)
            floats = [a for a in index.atoms(sympy.Indexed) if a.base.is_integer is not True]
            if index.is_integer is False or index.is_real is False or (
                    index.is_integer is None and floats):
                self.fail(part, f"an index of '{name}' must be an integer expression, got {index}")
            indices.append(index)
        return input_base(name, integer=integer)[(*indices, *([axis] if axis else []))]

    def _UnaryOp(self, node: ast.UnaryOp):
        if isinstance(node.op, (ast.Not, ast.Invert)):
            return sympy.Not(self.condition(node.operand))
        operand = self.number(node.operand)
        return -operand if isinstance(node.op, ast.USub) else operand

    def _BoolOp(self, node: ast.BoolOp):
        values = [self.condition(v) for v in node.values]
        return sympy.And(*values) if isinstance(node.op, ast.And) else sympy.Or(*values)

    def _BinOp(self, node: ast.BinOp):
        op = type(node.op)
        if op in _BITS:
            return self._bits(node, op)
        left, right = self.number(node.left), self.number(node.right)
        if op in (ast.Div, ast.FloorDiv, ast.Mod) and right.is_zero:
            self.fail(node, f"division by zero in '{_OP_TEXT[op]}'")
        if op is ast.Pow:
            return self._power(node, left, right)
        if op not in _ARITHMETIC:
            self.fail(node, f"operator '{_OP_TEXT.get(op, op.__name__)}' is not allowed")
        return _ARITHMETIC[op](left, right)

    def _bits(self, node: ast.BinOp, op):
        """``& | ^`` on two conditions are logical; on two integers, and ``<< >>``, bitwise."""
        left = self.as_condition(self.build(node.left))
        right = self.as_condition(self.build(node.right))
        if op in _LOGIC and _is_bool(left) and _is_bool(right):
            return _LOGIC[op](left, right)
        for side, value in ((node.left, left), (node.right, right)):
            if _is_bool(value) or value.is_integer is not True:
                self.fail(side, f"'{_OP_TEXT[op]}' takes two integers (bitwise) or two "
                                f"conditions (logical), got {value}")
        if op in (ast.LShift, ast.RShift) and right.is_Integer and not 0 <= right <= MAX_SHIFT:
            self.fail(node.right, f"a shift count must be in 0..{MAX_SHIFT}, got {right}")
        if op is ast.LShift and left.is_Integer and right.is_Integer and (
                abs(int(left)).bit_length() + int(right) > MAX_SHIFT):
            self.fail(node, f"{left} << {right} does not fit in 63 bits")
        return _BITS[op](left, right)

    def _power(self, node, base, exponent):
        if not exponent.is_Number:
            if not (base.is_Number and base > 0):
                self.fail(getattr(node, "right", node), f"an exponent must be a number, or the "
                          f"base a positive number (2 ** (h / heads)); got {base} ** {exponent}")
            return base ** exponent
        if abs(float(exponent)) > MAX_EXPONENT:
            self.fail(getattr(node, "right", node), f"exponent {exponent} is too large; at "
                                                    f"most {MAX_EXPONENT} in absolute value")
        if base.is_Number and base != 0:
            digits = abs(float(exponent)) * abs(math.log10(abs(float(base))))
            if digits > MAX_POWER_DIGITS:
                self.fail(node, f"{base}**{exponent} has about {digits:.0f} digits; at most "
                                f"{MAX_POWER_DIGITS} are allowed")
        if base.is_zero and exponent < 0:
            self.fail(node, "zero to a negative power divides by zero")
        return base ** exponent

    def _Compare(self, node: ast.Compare):
        """Numbers, or conditions (``==`` equivalent, ``!=`` exclusive or) on both sides."""
        operands = [self.as_condition(self.build(n)) for n in (node.left, *node.comparators)]
        conditions = any(map(_is_bool, operands))
        if conditions and not all(map(_is_bool, operands)):
            self.fail(node, "a comparison takes numbers, or conditions on both sides")
        table = _COMPARE_CONDITIONS if conditions else _COMPARE
        parts = []
        for op, left, right in zip(node.ops, operands, operands[1:], strict=False):
            if type(op) not in table:
                self.fail(node, "conditions can only be compared with == and !=" if conditions
                          else f"comparison '{type(op).__name__}' is not allowed")
            parts.append(table[type(op)](left, right))
        return sympy.And(*parts)

    def _reduction(self, node: ast.Call, gen):
        """``sum(body for d in range(N))``: a bounded sum over a new integer axis ``d``."""
        shape = "sum(<expression> for <name> in range(<N>))"
        if not isinstance(gen, ast.GeneratorExp) or len(gen.generators) != 1:
            self.fail(node, f"expected {shape}")
        loop = gen.generators[0]
        it = loop.iter
        if (loop.ifs or loop.is_async or not isinstance(loop.target, ast.Name)
                or not isinstance(it, ast.Call) or not isinstance(it.func, ast.Name)
                or it.func.id != "range" or len(it.args) != 1 or it.keywords):
            self.fail(node, f"expected {shape}")
        var = loop.target.id
        if var in self.scope.names or var in self.scope.inputs or var in FUNCTIONS or var == "inf":
            self.fail(loop.target, f"'{var}' is already a name; choose another for the sum")
        count = self.number(it.args[0])
        if not count.is_Integer or not 1 <= int(count) <= MAX_REDUCTION:
            self.fail(it, f"range() of a sum takes an integer 1..{MAX_REDUCTION}, got {count}")
        axis = sympy.Symbol(var, integer=True, nonnegative=True)
        inner = _Builder(dataclasses.replace(self.scope, names={**self.scope.names, var: axis},
                                             reductions=False), self.file, self.field, self.shift)
        return sympy.Sum(inner.number(gen.elt), (axis, 0, int(count) - 1))

    def _dot(self, node: ast.Call):
        """``dot(x[i, ...], y[j, ...])``: the inner product over the trailing axis of two
        inputs, each read with one index fewer than its rank; the Sum of the generator form."""
        reads, sizes = [], []
        for arg in node.args:
            root = arg
            while isinstance(root, ast.Subscript):
                root = root.value
            if arg is root or getattr(root, "id", None) not in self.scope.trailing:
                self.fail(arg, "dot() takes two reads of inputs, as x[b, h, q_idx] (the "
                               "trailing axis, left out, is the one contracted)")
            reads.append((arg, root.id))
            sizes.append(self.scope.trailing[root.id])
        if sizes[0] != sizes[1]:
            self.fail(node, f"dot() contracts axes of equal size; '{reads[0][1]}' has "
                            f"{sizes[0]}, '{reads[1][1]}' has {sizes[1]}")
        if not sizes[0].is_Integer or not 1 <= int(sizes[0]) <= MAX_REDUCTION:
            self.fail(node, f"dot() contracts an axis of a fixed size 1..{MAX_REDUCTION} (a "
                            f"number, or a size the spec fixes); got {sizes[0]}")
        axis = sympy.Symbol("d", integer=True, nonnegative=True)
        a, b = (self._Subscript(arg, axis) for arg, _ in reads)
        return sympy.Sum(a * b, (axis, 0, int(sizes[0]) - 1))

    def _IfExp(self, node: ast.IfExp):
        return self._choose(node, self.condition(node.test), node.body, node.orelse)

    def _choose(self, node, test, then_node, else_node):
        then, other = self.build(then_node), self.build(else_node)
        if _is_bool(then) != _is_bool(other):
            self.fail(node, "both branches must be numbers, or both conditions")
        if _is_bool(then):
            return sympy.Or(sympy.And(test, then), sympy.And(sympy.Not(test), other))
        return sympy.Piecewise((then, test), (other, True))

    def _Call(self, node: ast.Call):
        if not isinstance(node.func, ast.Name):
            self.fail(node, "only the functions " + ", ".join(FUNCTIONS) + " can be called")
        name = node.func.id
        if name not in FUNCTIONS:
            self.fail(node, f"unknown function '{name}'; expected one of: "
                            + ", ".join(FUNCTIONS))
        if node.keywords:
            self.fail(node, f"{name}() takes no keyword arguments")
        arity = FUNCTIONS[name]
        count = len(node.args)
        if (arity is None and count < 2) or (arity is not None and count != arity):
            expected = "at least 2" if arity is None else str(arity)
            self.fail(node, f"{name}() takes {expected} argument(s), got {count}")
        if name == "where":
            return self._choose(node, self.condition(node.args[0]), node.args[1], node.args[2])
        if name in ("sum", "dot") and not self.scope.reductions:
            self.fail(node, f"{name}(...) is allowed in score_mod only")
        if name == "sum":
            return self._reduction(node, node.args[0])
        if name == "dot":
            return self._dot(node)
        args = [self.number(a) for a in node.args]
        bad_log = name in ("log", "log2") and args[0].is_Number and args[0] <= 0
        if bad_log or (name == "sqrt" and args[0].is_Number and args[0] < 0):
            self.fail(node, f"{name}() of {args[0]} is not a real number")
        if name in ("pow", "exp2"):
            base, exponent = (args[0], args[1]) if name == "pow" else (sympy.Integer(2), args[0])
            return self._power(node, base, exponent)
        return _SYMPY_FUNCS[name](*args)
