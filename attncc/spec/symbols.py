"""The sympy symbols that spec expressions are built from.

Index symbols are non-negative integers, sizes positive integers, ``score`` a real number. Every
module that reads or writes expressions takes its symbols from here, so that a symbol built by the
parser is the very object a pass or a backend looks for.
"""

from __future__ import annotations

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
