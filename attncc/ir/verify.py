"""Structural checks of an IR graph; run after every pass in tests.

A failure is a bug in attncc (a pass or the builder), never a user mistake, so it raises
``IRError`` (a RuntimeError, not an AttnccError) naming the node and what is wrong.
"""

from __future__ import annotations

import networkx as nx

from attncc.ir.graph import (
    ATTENTION_NODES,
    Aggregate,
    FeatureMap,
    FusedAttention,
    Input,
    LinearAggregate,
    LinearAttention,
    Lowering,
    LowRankProject,
    Mask,
    MemoryConcat,
    Node,
    Normalize,
    Nystrom,
    Output,
    Path,
    Score,
    ScoreMod,
    op,
    operands,
)

__all__ = ["IRError", "verify"]

INPUT_ROLES = ("q", "k", "v", "input")

#: Operand counts per node type: (fewest, most); None = no upper bound.
ARITY: dict[type, tuple[int, int | None]] = {
    Input: (0, 0),
    LowRankProject: (2, 2),
    MemoryConcat: (2, 2),
    Score: (2, 3),
    ScoreMod: (1, None),
    Mask: (1, None),
    Normalize: (1, 1),
    Aggregate: (2, 2),
    FusedAttention: (3, None),
    FeatureMap: (1, 2),
    LinearAggregate: (3, 3),
    LinearAttention: (3, 4),
    Nystrom: (3, 3),
    Output: (1, 1),
}


class IRError(RuntimeError):
    """An IR graph breaks an invariant: an internal error of attncc, not a user mistake."""


def verify(graph: nx.DiGraph) -> nx.DiGraph:
    """Check ``graph`` and return it unchanged; raise IRError at the first broken invariant.

    Checks: every node has an ``op`` that is an instance of a Node subclass; the graph is a DAG;
    each node's operand ports are 0..n-1 without gaps and their count fits the node type; inputs
    have no operands, roles q/k/v/input and are read by something; an input of role ``input``
    names a spec input; there is exactly one Output and nothing reads it; after the ``shapes``
    pass every node has a shape; a FusedAttention's ``projection`` is the rank of the
    LowRankProject its keys come from (None without one); an attention node's ``lowering`` is a
    Lowering of named Paths with a reason each, and is set after the ``strategy`` pass.
    """
    for node_id, data in graph.nodes(data=True):
        op = data.get("op")
        if not isinstance(op, Node) or type(op) is Node:
            raise IRError(f"node '{node_id}': expected an 'op' that is a Node subclass instance, "
                          f"got {type(op).__name__ if op is not None else 'no op'}")
    if not nx.is_directed_acyclic_graph(graph):
        cycle = " -> ".join(str(u) for u, _ in nx.find_cycle(graph))
        raise IRError(f"the graph has a cycle: {cycle}")
    for node_id in graph.nodes:
        _check_ports(graph, node_id)
    _check_inputs(graph)
    _check_attention(graph)
    outputs = sorted(n for n, d in graph.nodes(data=True) if isinstance(d["op"], Output))
    if len(outputs) != 1:
        raise IRError(f"expected exactly one Output node, found {len(outputs)}: {outputs}")
    if graph.out_degree(outputs[0]):
        readers = sorted(graph.successors(outputs[0]))
        raise IRError(f"node '{outputs[0]}': Output is read by {readers}")
    if "shapes" in graph.graph.get("passes", ()):
        for node_id, data in graph.nodes(data=True):
            if data["op"].shape is None:
                raise IRError(f"node '{node_id}' ({data['op'].op_name}) has no shape after the "
                              f"shapes pass")
    return graph


def _check_ports(graph: nx.DiGraph, node_id: str) -> None:
    op = graph.nodes[node_id]["op"]
    ports = []
    for src, _, port in graph.in_edges(node_id, data="port"):
        if not isinstance(port, int) or isinstance(port, bool):
            raise IRError(f"node '{node_id}': edge from '{src}' has port {port!r}, expected an int")
        ports.append(port)
    if sorted(ports) != list(range(len(ports))):
        raise IRError(f"node '{node_id}' ({op.op_name}): operand ports {sorted(ports)}, expected "
                      f"0..{len(ports) - 1} without gaps or repeats")
    fewest, most = ARITY.get(type(op), (0, None))
    if len(ports) < fewest or (most is not None and len(ports) > most):
        expected = f"{fewest}" if fewest == most else f"{fewest}..{most if most else 'any'}"
        raise IRError(f"node '{node_id}' ({op.op_name}): expected {expected} operands, got "
                      f"{len(ports)} {operands(graph, node_id)}")


def _check_inputs(graph: nx.DiGraph) -> None:
    spec = graph.graph.get("spec")
    for node_id, data in graph.nodes(data=True):
        op = data["op"]
        if not isinstance(op, Input):
            continue
        if op.role not in INPUT_ROLES:
            raise IRError(f"input '{node_id}': role {op.role!r}, expected one of {INPUT_ROLES}")
        if op.role == "input" and spec is not None and op.name not in spec.inputs:
            raise IRError(f"input '{node_id}': '{op.name}' is not an input of the spec "
                          f"'{spec.name}' (it has {sorted(spec.inputs)})")
        if not graph.out_degree(node_id):
            raise IRError(f"input '{node_id}' ({op.name}) is read by no node")


def _check_attention(graph: nx.DiGraph) -> None:
    planned = "strategy" in graph.graph.get("passes", ())
    for node_id, data in graph.nodes(data=True):
        node = data["op"]
        if not isinstance(node, ATTENTION_NODES):
            continue
        if isinstance(node, FusedAttention):
            keys = op(graph, operands(graph, node_id)[1])
            rank = keys.rank if isinstance(keys, LowRankProject) else None
            if node.projection != rank:
                raise IRError(f"node '{node_id}': projection={node.projection!r}, but its keys "
                              f"come from {keys.op_name} (rank {rank})")
        lowering = node.lowering
        if lowering is None:
            if planned:
                raise IRError(f"node '{node_id}' ({node.op_name}) has no lowering after the "
                              f"strategy pass")
            continue
        paths = getattr(lowering, "paths", None)
        if (not isinstance(lowering, Lowering) or not isinstance(paths, tuple) or not paths
                or not all(isinstance(p, Path) and isinstance(p.name, str)
                           and isinstance(p.ok, bool) and isinstance(p.why, str) and p.why
                           for p in paths)):
            raise IRError(f"node '{node_id}': lowering must be a Lowering of Path(name, ok, why) "
                          f"with a reason each, got {lowering!r}")
        names = [p.name for p in paths]
        if len(set(names)) != len(names):
            raise IRError(f"node '{node_id}': lowering lists a path twice: {names}")
