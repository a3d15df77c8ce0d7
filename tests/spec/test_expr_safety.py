"""The expression parser against hostile and broken input.

Every input outside the grammar is a SpecError naming the field and (where there is one) the
column, raised quickly, with nothing evaluated: eval, exec, compile (other than ast-only parsing),
sympy.parse_expr and sympify of strings are made to explode and parsing still works. Hypothesis
then feeds random text and random expression trees: nothing but SpecError may come out.
"""

from __future__ import annotations

import ast
import builtins
import time

import pytest
import sympy
import sympy.parsing.sympy_parser as sympy_parser
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attncc.errors import SpecError
from attncc.spec import symbols as sym
from attncc.spec.expr import MAX_DEPTH, MAX_EXPONENT, MAX_LENGTH, MAX_NODES, Scope, parse_expr

SCOPE = Scope(
    names={**sym.INDEX_SYMBOLS, **sym.SIZES, "score": sym.score, "window": sympy.Integer(16)},
    inputs={"slope": (1, False), "doc": (2, True), "table": (2, True)},
    booleans=frozenset({"table"}),
)

ANY = "some column"
MAYBE = object()  # a column or none
# (text, fragment of the message, column: an int, None for no column, or ANY)
HOSTILE = [
    ("q_idx.__class__", "attribute access is not allowed", 1),
    ("(1).__class__.__bases__[0].__subclasses__()", "only the functions", 1),
    ("__import__('os').system('true')", "only the functions", 1),
    ("__import__('os')", "unknown function '__import__'", 1),
    ("__builtins__", "unknown name '__builtins__'", 1),
    ("q_idx + __dict__", "unknown name '__dict__'", 9),
    ("open('/etc/passwd')", "unknown function 'open'", 1),
    ("eval('1')", "unknown function 'eval'", 1),
    ("exec('x = 1')", "unknown function 'exec'", 1),
    ("getattr(q_idx, 'real')", "unknown function 'getattr'", 1),
    ("lambda: 1", "a lambda is not allowed", 1),
    ("(lambda: 1)()", "only the functions", 1),
    ("[q_idx for q_idx in b]", "a comprehension is not allowed", 1),
    ("max(1, (x for x in b))", "a comprehension is not allowed", 8),
    ("{x: 1 for x in b}", "a comprehension is not allowed", 1),
    ("f'{q_idx}'", "an f-string is not allowed", 1),
    ("'text'", "expected a number, got the str 'text'", 1),
    ("b'bytes'", "expected a number, got the bytes", 1),
    ("...", "expected a number, got the ellipsis", 1),
    ("1j", "expected a number, got the complex", 1),
    ("(x := 1)", "an assignment expression is not allowed", 2),
    ("await q_idx", "await is not allowed", 1),
    ("[1, 2]", "a list is not allowed", 1),
    ("{1: 2}", "a dict is not allowed", 1),
    ("{1, 2}", "a set is not allowed", 1),
    ("(1, 2)", "Tuple is not allowed", 1),
    ("slope[0:2]", "a slice is not allowed", 7),
    ("max(1, *b)", "a starred is not allowed", 8),
    ("sqrt(x=1)", "takes no keyword arguments", 1),
    ("9**9**9", f"at most {MAX_EXPONENT}", 4),
    ("2**1000", f"at most {MAX_EXPONENT}", 4),
    ("q_idx ** seq_q", "an exponent must be a number", 10),
    ("(10**60)**10", "digits", 1),
    ("1e999", "numbers must be finite", 1),
    ("1 / 0", "division by zero", 1),
    ("q_idx // (seq_q - seq_q)", "division by zero", 1),
    ("q_idx % 0", "division by zero", 1),
    ("0 ** -1", "zero to a negative power", 1),
    ("log(0)", "log() of 0 is not a real number", 1),
    ("sqrt(-4)", "sqrt() of -4 is not a real number", 1),
    ("foo + 1", "unknown name 'foo'; expected one of: b, batch", 1),
    ("q_idx < window and nope", "unknown name 'nope'", 20),
    ("q_idx[0]", "only inputs can be indexed", 1),
    ("sqrt[1]", "only inputs can be indexed", 1),
    ("slope", "input 'slope' must be indexed, as slope[...]", 1),
    ("slope[h, h]", "input 'slope' has 1 dimension(s); got 2 index(es)", 1),
    ("doc[b]", "input 'doc' has 2 dimension(s); got 1 index(es)", 1),
    ("slope[0.5]", "an index of 'slope' must be an integer expression", 7),
    ("slope[0.5]", "must be an integer expression", 7),
    ("slope[slope[h]]", "must be an integer expression", 7),
    ("sqrt", "'sqrt' is a function; call it as sqrt(...)", 1),
    ("sqrt(1, 2)", "sqrt() takes 1 argument(s), got 2", 1),
    ("exp()", "exp() takes 1 argument(s), got 0", 1),
    ("min(1)", "min() takes at least 2 argument(s), got 1", 1),
    ("where(q_idx > 1, 1)", "where() takes 3 argument(s), got 2", 1),
    ("where(q_idx, 1, 2)", "expected a condition here", 7),
    ("q_idx > 1 + (kv_idx < 2)", "expected a number here, got the condition", 14),
    ("1 if q_idx else 2", "expected a condition here", 6),
    ("(q_idx < 1) if q_idx < 2 else 3", "both branches must be numbers, or both conditions", 1),
    ("not q_idx", "expected a condition here", 5),
    ("q_idx << 70", "a shift count must be in 0..62", 10),
    ("q_idx @ kv_idx", "operator '@' is not allowed", 1),
    ("q_idx ^ (kv_idx > 1)", "'^' takes two integers (bitwise) or two conditions", 10),
    ("q_idx is 1", "comparison 'Is' is not allowed", 1),
    ("q_idx in b", "comparison 'In' is not allowed", 1),
    ("q_idx +", "not a valid expression", 8),
    ("(q_idx", "'(' was never closed", 1),
    ("q_idx; import os", "not a valid expression", 6),
    ("q_idx\x00", "null bytes", 7),
    ("   ", "expected an expression, got empty text", None),
    ("   q_idx + foo", "unknown name 'foo'", 12),
    ("(" * 10_000 + "1" + ")" * 10_000, f"at most {MAX_LENGTH}", None),
    ("q_idx + " * 200_000 + "1", f"at most {MAX_LENGTH}", None),
    # Python's own parser refuses it (no column) unless the recursion limit has been raised
    # (torch.compile raises it), then the depth rule does (a column): either is clear
    ("-" * 3_000 + "1", "", MAYBE),
    ("not " * 1000 + "True", f"deeper than {MAX_DEPTH}", 4 * MAX_DEPTH + 1),
    ("+".join(["q_idx"] * 600), f"deeper than {MAX_DEPTH}", ANY),
    ("max(" + ",".join(["1"] * (MAX_NODES + 10)) + ")", f"more than {MAX_NODES} parts", None),
]


@pytest.mark.parametrize(("text", "fragment", "column"), HOSTILE,
                         ids=[repr(t[:30]) for t, _, _ in HOSTILE])
def test_hostile_input_is_a_clear_spec_error(text, fragment, column):
    start = time.process_time()
    with pytest.raises(SpecError) as info:
        parse_expr(text, SCOPE, field="mask", file="spec.yaml", want="any")
    # Generous bound stated by the issue (errors come "well under a second"); not a benchmark.
    # This process's CPU time, not the wall clock: other processes on a loaded machine do not
    # count against it.
    assert time.process_time() - start < 1.0
    err = info.value
    message = str(err)
    assert message.startswith("spec.yaml: mask: ") and "\n" not in message
    assert fragment in message, message
    assert err.file == "spec.yaml" and err.field == "mask"
    if column is MAYBE:
        assert err.column is None or err.column >= 1, message
    elif column is ANY:
        assert isinstance(err.column, int) and err.column >= 1, message
    else:
        assert err.column == column, message
    assert len(message) < 400


def test_wrong_kind_for_the_field():
    with pytest.raises(SpecError, match="expected a condition"):
        parse_expr("q_idx + 1", SCOPE, field="mask", want="bool")
    with pytest.raises(SpecError, match="expected a number, got the condition"):
        parse_expr("q_idx < 1", SCOPE, field="score_mod", want="number")


def test_grammar_that_is_allowed():
    s = sym
    cases = {
        "kv_idx <= q_idx and q_idx - kv_idx < window": sympy.And(
            s.kv_idx <= s.q_idx, s.q_idx - s.kv_idx < 16),
        "(kv_idx <= q_idx) & ~(q_idx > 3) | False": sympy.Or(
            sympy.And(s.kv_idx <= s.q_idx, sympy.Not(s.q_idx > 3)), sympy.false),
        "0 <= kv_idx < q_idx": sympy.And(s.kv_idx >= 0, s.kv_idx < s.q_idx),
        "q_idx // 4 % 3 ** 2": sympy.Mod(sympy.floor(s.q_idx / 4), 9),
        "where(q_idx > 1, score, -score)": sympy.Piecewise((s.score, s.q_idx > 1),
                                                            (-s.score, True)),
        "max(q_idx, kv_idx, 2) - min(q_idx, 1)": sympy.Max(s.q_idx, s.kv_idx, 2)
        - sympy.Min(s.q_idx, 1),
        "abs(floor(score) + ceil(score))": sympy.Abs(sympy.floor(s.score)
                                                     + sympy.ceiling(s.score)),
        "table[q_idx, kv_idx] and q_idx > 0": sympy.And(sympy.Ne(
            sympy.IndexedBase("table", integer=True)[s.q_idx, s.kv_idx], 0), s.q_idx > 0),
        "slope[doc[b, q_idx]] * sigmoid(score)": sympy.IndexedBase("slope", real=True)[
            sympy.IndexedBase("doc", integer=True)[s.b, s.q_idx]] * sym.sigmoid(s.score),
    }
    for text, expected in cases.items():
        assert parse_expr(text, SCOPE, field="f", want="any") == expected, text


def test_nothing_is_evaluated(monkeypatch):
    """Parsing never calls eval/exec, compiles only to an AST, and never parses text with sympy."""
    real_compile = builtins.compile

    def boom(*args, **kwargs):
        raise AssertionError("evaluated")

    def ast_only_compile(source, filename, mode, flags=0, *args, **kwargs):
        if not flags & ast.PyCF_ONLY_AST:
            raise AssertionError("compiled to code")
        return real_compile(source, filename, mode, flags, *args, **kwargs)

    real_sympify = sympy.sympify

    def sympify_no_strings(value, *args, **kwargs):
        if isinstance(value, str):
            raise AssertionError("sympify of a string")
        return real_sympify(value, *args, **kwargs)

    monkeypatch.setattr(builtins, "eval", boom)
    monkeypatch.setattr(builtins, "exec", boom)
    monkeypatch.setattr(builtins, "compile", ast_only_compile)
    monkeypatch.setattr(sympy_parser, "parse_expr", boom)
    monkeypatch.setattr(sympy_parser, "eval_expr", boom)
    monkeypatch.setattr(sympy, "parse_expr", boom)
    monkeypatch.setattr(sympy, "sympify", sympify_no_strings)
    with pytest.raises(AssertionError):  # the traps are live
        sympy.sympify("1 + 1")
    result = parse_expr("where(q_idx > 1, score - slope[h] * (q_idx - kv_idx), 2 ** -3)", SCOPE,
                        field="score_mod")
    assert sym.score in result.free_symbols
    with pytest.raises(SpecError, match="only the functions"):
        parse_expr("__import__('os').system('echo pwned')", SCOPE, field="mask", want="bool")
    from attncc import load_spec  # the whole loader, too
    spec = load_spec("attncc: 1\nmask: kv_idx <= q_idx\nconstants: {c: 2}\n"
                     "score_mod: score * c\n")
    assert spec.is_causal


# --- fuzzing -------------------------------------------------------------------------------------

ATOMS = st.sampled_from([
    "q_idx", "kv_idx", "b", "h", "score", "seq_q", "window", "0", "1", "2.5", "-3", "True",
    "1e308", "1e999", "nope", "__class__", "'s'", "slope[h]", "doc[b, q_idx]", "table[q_idx, 0]",
    "slope", "sqrt", "None", "[]", "lambda: 0", "...",
])
BINARY = st.sampled_from(["+", "-", "*", "/", "//", "%", "**", "<", "<=", "==", "!=", ">",
                          " and ", " or ", "&", "|", "^", "<<", "@", " is ", " in ", "."])
FUNCS = st.sampled_from(["sqrt", "exp", "log", "tanh", "sigmoid", "abs", "min", "max", "floor",
                         "ceil", "where", "open", "eval", "slope", "doc"])


def _expressions():
    def extend(inner):
        return st.one_of(
            st.tuples(inner, BINARY, inner).map(lambda t: f"({t[0]}{t[1]}{t[2]})"),
            st.tuples(st.sampled_from(["-", "not ", "~", "+"]), inner).map("".join),
            st.tuples(FUNCS, st.lists(inner, max_size=4)).map(
                lambda t: f"{t[0]}({', '.join(t[1])})"),
            st.tuples(inner, inner, inner).map(lambda t: f"({t[0]} if {t[1]} else {t[2]})"),
            st.tuples(st.sampled_from(["slope", "doc", "table", "q_idx"]),
                      st.lists(inner, min_size=1, max_size=3)).map(
                lambda t: f"{t[0]}[{', '.join(t[1])}]"),
        )
    return st.recursive(ATOMS, extend, max_leaves=25)


FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def _parse_or_spec_error(text, want):
    try:
        result = parse_expr(text, SCOPE, field="f", want=want)
    except SpecError as err:
        assert err.field == "f"
        return None
    assert isinstance(result, sympy.Basic)
    return result


@FUZZ
@given(st.text(max_size=200), st.sampled_from(["any", "bool", "number"]))
def test_random_text_raises_only_spec_error(text, want):
    _parse_or_spec_error(text, want)


@FUZZ
@given(st.text(alphabet="q_idxkvbh0123456789+-*/%<>=!()[], .andornotwhere", max_size=80))
def test_random_token_soup_raises_only_spec_error(text):
    _parse_or_spec_error(text, "any")


@FUZZ
@given(_expressions(), st.sampled_from(["any", "bool", "number"]))
def test_random_expression_trees_raise_only_spec_error(text, want):
    result = _parse_or_spec_error(text, want)
    if result is not None and want != "any":
        is_condition = isinstance(result, sympy.logic.boolalg.Boolean) and not isinstance(
            result, sympy.Expr)
        assert is_condition == (want == "bool")


def test_constant_functions_become_plain_numbers():
    """exp(1) would be sympy.E, not a Number; the parser hands on plain Floats instead."""
    result = parse_expr("q_idx < exp(1) * kv_idx + sqrt(2)", SCOPE, field="mask", want="bool")
    numbers = [a for a in result.atoms(sympy.Number)]
    assert not result.atoms(sympy.NumberSymbol) and len(numbers) == 2
    assert {round(float(n), 6) for n in numbers} == {2.718282, 1.414214}
    assert parse_expr("1 / sqrt(64)", SCOPE, field="scale") == sympy.Rational(1, 8)
