"""The IR as stable text: what golden tests compare and what ``attncc show`` prints.

One line per node in topological order (ties broken by node id)::

    %score = Score(kind=dot, scale=1/sqrt(head_dim))(%q, %k) : [batch, heads, seq_q, seq_k]

Inputs have no operand list; `` : [shape]`` appears once the ``shapes`` pass has run. A header
line names the spec and the passes applied; the lowering paths of the attention node (one
``# lowering.<path> = yes|no: <why>`` line each, the node line saying only yes or no) and the cost
formulas, when present, close the text.
Sympy objects print with ``str()``; strings print bare; tuples print as ``[a, b]``.
"""

from __future__ import annotations

import networkx as nx

from attncc.ir.graph import Lowering, Node, operands

__all__ = ["format_value", "print_graph"]


def print_graph(graph: nx.DiGraph) -> str:
    """The text of ``graph`` (ends with a newline); equal graphs print equal text."""
    spec = graph.graph.get("spec")
    passes = ", ".join(graph.graph.get("passes", ())) or "none"
    lines = [f"# {spec.name if spec is not None else 'graph'} (passes: {passes})"]
    for node_id in nx.lexicographical_topological_sort(graph, key=str):
        lines.append(_node_line(graph, node_id))
    for node_id in sorted(graph.nodes, key=str):
        lowering = getattr(graph.nodes[node_id]["op"], "lowering", None)
        for path in lowering.paths if lowering is not None else ():
            lines.append(f"# lowering.{path.name} = {'yes' if path.ok else 'no'}: {path.why}")
    for key, value in graph.graph.get("cost", {}).items():
        lines.append(f"# cost.{key} = {format_value(value)}")
    return "\n".join(lines) + "\n"


def _node_line(graph: nx.DiGraph, node_id: str) -> str:
    op = graph.nodes[node_id]["op"]
    text = f"%{node_id} = {_call(op)}"
    args = operands(graph, node_id)
    if args:
        text += "(" + ", ".join(f"%{a}" for a in args) + ")"
    if op.shape is not None:
        text += " : " + format_value(op.shape)
    return text


def _call(op: Node) -> str:
    attrs = ", ".join(f"{k}={format_value(v)}" for k, v in op.attrs().items())
    return f"{op.op_name}({attrs})"


def format_value(value) -> str:
    """One attribute or shape as text: nodes as calls, sympy via str(), sequences as [a, b]."""
    if isinstance(value, Node):
        return _call(value)
    if isinstance(value, Lowering):
        return "Lowering(" + ", ".join(f"{p.name}={'yes' if p.ok else 'no'}"
                                       for p in value.paths) + ")"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)
