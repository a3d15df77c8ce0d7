"""Pairs a score_mod drops: ``where(c, x, -inf)`` is ``x`` under the mask ``c``.

A score of -inf removes its pair exactly as a false mask does (softmax, sigmoid and top-k all
give it weight 0; a row with no other pair outputs 0 and lse -inf). The IR builder moves the
condition of such a score_mod into the mask, so the block plan skips the blocks it removes and
backends evaluate no -inf scores; a -inf the split cannot move (a condition reading ``score``)
stays in the score_mod, and backends drop a pair whose score is -inf.
"""

from __future__ import annotations

import sympy

from attncc.spec.symbols import score

__all__ = ["split_dropped"]

_NEG_INF = sympy.S.NegativeInfinity


def split_dropped(expr: sympy.Expr) -> tuple[sympy.Expr, sympy.Basic]:
    """``(value, keep)`` with ``expr == where(keep, value, -inf)``; ``keep`` never reads the
    score (``sympy.true`` when nothing can be moved)."""
    if expr is _NEG_INF:
        return sympy.Integer(0), sympy.false
    if isinstance(expr, sympy.Piecewise) and len(expr.args) == 2:
        (first, cond), (second, _) = expr.args
        if score not in cond.free_symbols:
            if second is _NEG_INF:
                value, keep = split_dropped(first)
                return value, sympy.And(cond, keep)
            if first is _NEG_INF:
                value, keep = split_dropped(second)
                return value, sympy.And(sympy.Not(cond), keep)
    if isinstance(expr, sympy.Add):
        parts = [split_dropped(a) for a in expr.args]
        return sympy.Add(*(v for v, _ in parts)), sympy.And(*(k for _, k in parts))
    return expr, sympy.true
