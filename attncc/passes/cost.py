"""The ``cost`` pass: FLOPs and bytes as sympy formulas of the sizes and the mask density.

``graph.graph["cost"]`` becomes ``{"flops": expr, "bytes": expr, "density": expr}``, summed over
the nodes from their symbolic shapes (so it needs the ``shapes`` pass). Conventions, as the
FlashAttention papers count:

- FLOPs count multiply-adds as 2 and nothing else: exp, score_mod and the mask are free.
  A kept (query, key) pair costs ``2·head_dim`` for a dot score (``4·head_dim`` for an additive
  score: add, tanh, multiply-add) plus ``2·value_dim`` to aggregate. Masked pairs are
  ``density`` (``attncc.spec.symbols.density``, the kept fraction) of all pairs; memory tokens are
  always kept. ``density`` is 1 in the formulas of a spec without a mask.
- Linear attention with F features (``features`` for performer, else head_dim):
  ``2·F·(value_dim + 1)`` per key (the running state and normalizer) and per query (the readout),
  plus ``2·F·head_dim`` per row for the performer projection; causal costs the same.
- Nyström with M landmarks: the six products of Xiong et al. plus ``48·M³`` for the pseudo-inverse
  (6 Newton–Schulz iterations of 4 M×M products), per batch and query head.
- Linformer: ``2·rank·seq_k·dim`` per kv head for each projection.
- Bytes: the compulsory traffic, each runtime tensor read once and the output written once. q, k,
  v and the output count ``itemsize`` bytes per element (the symbol ``ITEMSIZE``: 2 for float16,
  4 for float32); named inputs count the bytes of their declared dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx
import sympy

from attncc.errors import InputError
from attncc.ir.graph import (
    FusedAttention,
    Input,
    LinearAttention,
    LowRankProject,
    Nystrom,
    Output,
    derive,
    op,
    operands,
)
from attncc.ir.verify import IRError
from attncc.spec import symbols
from attncc.spec.symbols import SIZES

__all__ = ["ITEMSIZE", "Cost", "evaluate_cost"]

#: The kept fraction of masked (query, key) pairs.
DENSITY = symbols.density

#: Bytes per element of q, k, v and the output.
ITEMSIZE = sympy.Symbol("itemsize", integer=True, positive=True)

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "int32": 4, "int64": 8,
               "bool": 1}
NEWTON_SCHULZ_FLOPS_PER_M3 = 48


@dataclass(frozen=True)
class Cost:
    """Set ``graph.graph["cost"]`` to the FLOPs and bytes formulas of a shaped graph."""

    name: str = "cost"

    def apply(self, graph: nx.DiGraph) -> nx.DiGraph:
        result = derive(graph, self.name)
        flops = sympy.Integer(0)
        traffic = sympy.Integer(0)
        masked = False
        for node_id in sorted(result.nodes):
            node = op(result, node_id)
            if node.shape is None:
                raise IRError(f"cost: node '{node_id}' has no shape; run the shapes pass first")
            args = [op(result, a).shape for a in operands(result, node_id)]
            flops += _flops(node, args)
            traffic += _bytes(node, result.graph["spec"])
            masked = masked or (isinstance(node, FusedAttention) and node.mask is not None)
        result.graph["cost"] = {"flops": flops, "bytes": traffic,
                                "density": DENSITY if masked else sympy.Integer(1)}
        return result


def _flops(node, args) -> sympy.Expr:
    if isinstance(node, FusedAttention):
        (batch, heads, seq_q, head_dim), k, v = args[0], args[1], args[2]
        per_pair = (4 if node.score == "additive" else 2) * head_dim + 2 * v[3]
        keys = k[2] * (DENSITY if node.mask is not None else 1) + node.memory_tokens
        return batch * heads * seq_q * keys * per_pair
    if isinstance(node, LinearAttention):
        (batch, heads, seq_q, head_dim), k, v = args[0], args[1], args[2]
        width = node.features if node.feature_map == "performer" else head_dim
        rows = batch * (k[1] * k[2] + heads * seq_q)  # keys into the state, queries out of it
        total = rows * (2 * width * (v[3] + 1))
        if node.feature_map == "performer":
            total += rows * 2 * width * head_dim
        return total
    if isinstance(node, Nystrom):
        (batch, heads, seq_q, head_dim), seq_k, value_dim = args[0], args[1][2], args[2][3]
        m = node.landmarks
        products = (seq_q * m * head_dim + m * m * head_dim + m * seq_k * head_dim
                    + m * seq_k * value_dim + seq_q * m * m + seq_q * m * value_dim)
        return batch * heads * (2 * products + NEWTON_SCHULZ_FLOPS_PER_M3 * m**3)
    if isinstance(node, LowRankProject):
        batch, kv_heads, seq_k, dim = args[0]
        return 2 * batch * kv_heads * node.rank * seq_k * dim
    return sympy.Integer(0)


def _bytes(node, spec) -> sympy.Expr:
    if isinstance(node, Output) or (isinstance(node, Input) and node.role != "input"):
        return sympy.Mul(*node.shape) * ITEMSIZE
    if isinstance(node, Input):
        return sympy.Mul(*node.shape) * DTYPE_BYTES[spec.inputs[node.name].dtype]
    return sympy.Integer(0)


def evaluate_cost(graph: nx.DiGraph, sizes: dict[str, int], density: float = 1.0,
                  itemsize: int = 4) -> dict[str, float]:
    """The cost formulas of ``graph`` at ``sizes``: {"flops", "bytes", "density", "intensity"}.

    Sizes missing from ``sizes`` are taken from the spec where it fixes them (heads, kv_heads,
    head_dim, value_dim; seq_k defaults to seq_q); ``density`` is the kept fraction of masked
    pairs (ignored for specs without a mask); intensity is FLOPs per byte. Raises InputError
    naming any size still unknown.
    """
    cost = graph.graph.get("cost")
    if cost is None:
        raise IRError("evaluate_cost: the graph has no cost; run the cost pass first")
    if not 0.0 <= density <= 1.0:
        raise InputError(f"density: expected a fraction in [0, 1], got {density}")
    known = _with_spec_sizes(dict(sizes), graph.graph["spec"])
    subs = {**{SIZES[name]: value for name, value in known.items()}, DENSITY: density,
            ITEMSIZE: itemsize}
    values = {}
    for key in ("flops", "bytes", "density"):
        expr = sympy.sympify(cost[key]).subs(subs)
        if expr.free_symbols:
            missing = ", ".join(sorted(str(s) for s in expr.free_symbols))
            raise InputError(f"cost: sizes missing: {missing}; got {sorted(sizes)}")
        values[key] = float(expr)
    values["intensity"] = values["flops"] / values["bytes"] if values["bytes"] else math.inf
    return values


def _with_spec_sizes(sizes: dict, spec) -> dict:
    for name in ("heads", "head_dim"):
        if name not in sizes and getattr(spec, name) is not None:
            sizes[name] = getattr(spec, name)
    defaults = {"kv_heads": spec.kv_heads or sizes.get("heads"),
                "value_dim": spec.value_dim or sizes.get("head_dim"),
                "seq_k": sizes.get("seq_q")}
    for name, value in defaults.items():
        if name not in sizes and value is not None:
            sizes[name] = value
    return sizes

