"""The ``shapes`` pass: every node gets its symbolic shape, a tuple of sympy expressions.

Shapes are over the size symbols of ``attncc.spec.symbols.SIZES`` (they stay symbolic even where
the spec fixes a size, so one formula serves every call); runtime inputs take their declared shape.
Layouts: q ``[batch, heads, seq_q, head_dim]``, k ``[batch, kv_heads, seq_k, head_dim]``,
v ``[batch, kv_heads, seq_k, value_dim]``; scores ``[batch, heads, seq_q, keys]`` where keys is
``seq_k``, ``rank`` after a linformer projection, plus ``M`` with memory tokens; the output
``[batch, heads, seq_q, value_dim]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import networkx as nx
import sympy

from attncc.ir.graph import (
    Aggregate,
    FeatureMap,
    FusedAttention,
    Input,
    LinearAggregate,
    LinearAttention,
    LowRankProject,
    Mask,
    MemoryConcat,
    Node,
    Normalize,
    Nystrom,
    Output,
    Score,
    ScoreMod,
    Shape,
    derive,
    op,
    operands,
)
from attncc.spec.symbols import TENSORS

__all__ = ["Shapes", "node_shape"]

@dataclass(frozen=True)
class Shapes:
    """Assign ``shape`` to every node, in topological order, from its operands' shapes."""

    name: str = "shapes"

    def apply(self, graph: nx.DiGraph) -> nx.DiGraph:
        result = derive(graph, self.name)
        spec = graph.graph["spec"]
        for node_id in nx.lexicographical_topological_sort(result, key=str):
            node = op(result, node_id)
            args = [op(result, a).shape for a in operands(result, node_id)]
            shape = node_shape(node, args, spec)
            result.nodes[node_id]["op"] = dataclasses.replace(node, shape=shape)
        return result


def node_shape(node: Node, args: list[Shape], spec) -> Shape:
    """The shape of ``node`` given its operands' shapes (in port order)."""
    rule = _RULES.get(type(node))
    if rule is None:
        raise TypeError(f"shapes: no shape rule for node type {type(node).__name__}")
    return tuple(sympy.sympify(d) for d in rule(node, args, spec))


def _input(node: Input, args, spec) -> Shape:
    if node.role in TENSORS:
        return TENSORS[node.role]
    return spec.inputs[node.name].shape


def _feature_map(node: FeatureMap, args, spec) -> Shape:
    width = node.features if node.kind == "performer" else args[0][3]
    return (*args[0][:3], width)


def _seq_replaced(args, length) -> Shape:
    """The first operand's shape with ``length`` on the sequence axis."""
    return (*args[0][:2], length, *args[0][3:])


def _rows_by_v(node, args, spec) -> Shape:
    """The first operand's rows, v's last axis: v is operand 1 of Aggregate (weights, v) and
    operand 2 of the attention nodes (q, k, v, ...): [batch, heads, seq_q, value_dim]."""
    v = args[1] if isinstance(node, Aggregate) else args[2]
    return (*args[0][:3], v[3])


def _same(node, args, spec) -> Shape:
    return args[0]


_RULES: dict[type, Callable[[Node, list[Shape], object], Shape]] = {
    Input: _input,
    LowRankProject: lambda node, args, spec: _seq_replaced(args, node.rank),
    MemoryConcat: lambda node, args, spec: _seq_replaced(args, args[0][2] + node.tokens),
    Score: lambda node, args, spec: (*args[0][:3], args[1][2]),  # q rows, k's keys
    ScoreMod: _same,
    Mask: _same,
    Normalize: _same,
    Aggregate: _rows_by_v,
    FeatureMap: _feature_map,
    LinearAggregate: _rows_by_v,
    FusedAttention: _rows_by_v,
    LinearAttention: _rows_by_v,
    Nystrom: _rows_by_v,
    Output: _same,
}
