"""The IR: typed, frozen node dataclasses on a networkx DiGraph.

A graph's nodes are string ids; each carries its node object under the attribute ``op``. An edge
``u -> v`` carries ``port`` (the operand position of ``u`` in ``v``). ``graph.graph["spec"]`` is the
Spec the graph was built from, ``graph.graph["passes"]`` the names of the passes applied so far (in
order; ``derive`` appends one). Passes return new graphs; node objects are never mutated (replace
them with ``dataclasses.replace``).

Before ``fuse``, attention is the chain ``Score -> ScoreMod -> Mask -> Normalize -> Aggregate``;
after it, one ``FusedAttention`` (or ``LinearAttention``, or ``Nystrom``) node, on which the
``strategy`` pass records a ``Lowering``: the paths that serve it, and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import networkx as nx
import sympy

Shape = tuple[sympy.Expr, ...]


@dataclass(frozen=True)
class Node:
    """Base of every IR node. ``shape`` is filled in by the ``shapes`` pass (None before it)."""

    shape: Shape | None = field(default=None, kw_only=True)

    @property
    def op_name(self) -> str:
        return type(self).__name__

    def attrs(self) -> dict:
        """The node's attributes other than ``shape``, in declaration order (for printing)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "shape"}


@dataclass(frozen=True)
class Input(Node):
    """A runtime tensor: ``role`` is q, k, v, or input (a named spec input)."""

    name: str
    role: str
    dtype: str = "float"


@dataclass(frozen=True)
class LowRankProject(Node):
    """Linformer: (x, P) -> P·x along the sequence axis, ``rank`` rows long.

    One node per projected tensor (a DiGraph has one edge per pair of nodes, so a node has one
    result): ``k_proj`` = (k, E) and ``v_proj`` = (v, F).
    """

    rank: int


@dataclass(frozen=True)
class MemoryConcat(Node):
    """(k or v, mem) -> the memory tokens prepended along the sequence; always visible."""

    tokens: int


@dataclass(frozen=True)
class Score(Node):
    """(q, k[, w]) -> scores: ``dot`` is scale·q·kᵀ, ``additive`` is Σ_d w[h,d]·tanh(q_d + k_d)."""

    kind: str
    scale: sympy.Expr


@dataclass(frozen=True)
class ScoreMod(Node):
    """(scores, inputs the expression reads...) -> expr(score, b, h, q_idx, kv_idx, inputs...).

    Memory-token keys (first after a ``MemoryConcat``) are left as they are; ``kv_idx`` counts the
    keys after them.
    """

    expr: sympy.Expr


@dataclass(frozen=True)
class Mask(Node):
    """(scores, inputs the expression reads...) -> scores without the pairs where ``expr`` is false.

    Memory-token keys are always kept; ``kv_idx`` counts the keys after them.

    The ``masks`` pass fills ``reads_inputs`` (input names the mask reads) and ``varies_with``
    (which of b, h the mask depends on).
    """

    expr: sympy.Basic
    reads_inputs: tuple[str, ...] = ()
    varies_with: tuple[str, ...] = ()


@dataclass(frozen=True)
class Normalize(Node):
    """scores -> weights: softmax, sigmoid, or topk (softmax over the K largest kept)."""

    kind: str
    topk: int | None = None


@dataclass(frozen=True)
class Aggregate(Node):
    """(weights, v) -> weights·v."""


@dataclass(frozen=True)
class Path:
    """One way to lower an attention node: ``name`` (e.g. ``sdpa``), whether it serves the node
    (``ok``), and ``why``, a sentence a user can read."""

    name: str
    ok: bool
    why: str


@dataclass(frozen=True)
class Lowering:
    """The lowering paths the ``strategy`` pass found for an attention node, in its order.

    Backend-neutral: a backend picks the first path it implements that ``allows``; a path not
    listed does not serve the node.
    """

    paths: tuple[Path, ...]

    def allows(self, name: str) -> bool:
        """Whether path ``name`` serves the node (False for a path not listed)."""
        return any(p.name == name and p.ok for p in self.paths)

    def why(self, name: str) -> str:
        """The reason path ``name`` serves the node or does not."""
        for p in self.paths:
            if p.name == name:
                return p.why
        listed = ", ".join(p.name for p in self.paths)
        return f"'{name}' is not a lowering path of this node (it has {listed})"


@dataclass(frozen=True)
class FusedAttention(Node):
    """The flash pattern after ``fuse``: (q, k, v[, inputs]) -> out, never materializing scores.

    ``memory_tokens`` keys come first and skip score_mod and mask. ``projection`` is the number
    of keys after a Linformer projection of k and v (the keys the mask and the block plan see),
    None without one. ``lowering`` is filled by the ``strategy`` pass.
    """

    score: str
    scale: sympy.Expr
    score_mod: sympy.Expr | None
    mask: Mask | None
    normalize: str
    topk: int | None
    memory_tokens: int
    projection: int | None = None
    lowering: Lowering | None = None


@dataclass(frozen=True)
class FeatureMap(Node):
    """(x[, omega]) -> φ(x) for linear attention: elu1, relu, or performer.

    ``features`` is the number of random features of performer (None otherwise).
    """

    kind: str
    features: int | None = None


@dataclass(frozen=True)
class LinearAggregate(Node):
    """(φq, φk, v) -> Σ_j φq_i·φk_j v_j / Σ_j φq_i·φk_j, over j ≤ i when ``causal``."""

    causal: bool


@dataclass(frozen=True)
class LinearAttention(Node):
    """Linear attention after ``fuse``: computed in chunks, causal by running prefix sums.

    ``lowering`` is filled by the ``strategy`` pass (as on FusedAttention)."""

    feature_map: str
    features: int | None
    causal: bool
    lowering: Lowering | None = None


@dataclass(frozen=True)
class Nystrom(Node):
    """(q, k, v) -> Nyström attention with ``landmarks`` segment-mean landmarks.

    ``lowering`` is filled by the ``strategy`` pass (as on FusedAttention)."""

    landmarks: int
    scale: sympy.Expr
    lowering: Lowering | None = None


@dataclass(frozen=True)
class Output(Node):
    """The result ``(B, Hq, Nq, Dv)``."""


ATTENTION_NODES = (FusedAttention, LinearAttention, Nystrom)


def new_graph(spec) -> nx.DiGraph:
    """An empty IR graph for ``spec``."""
    graph = nx.DiGraph()
    graph.graph["spec"] = spec
    graph.graph["passes"] = ()
    return graph


def derive(graph: nx.DiGraph, pass_name: str) -> nx.DiGraph:
    """A copy of ``graph`` (same node objects) recording that pass ``pass_name`` produced it."""
    result = graph.copy()
    result.graph["passes"] = (*graph.graph.get("passes", ()), pass_name)
    return result


def add(graph: nx.DiGraph, node_id: str, op: Node, *operands: str) -> str:
    """Add node ``node_id`` computing ``op`` of ``operands`` (node ids, in port order)."""
    graph.add_node(node_id, op=op)
    for port, src in enumerate(operands):
        graph.add_edge(src, node_id, port=port)
    return node_id


def op(graph: nx.DiGraph, node_id: str) -> Node:
    """The node object of ``node_id``."""
    return graph.nodes[node_id]["op"]


def operands(graph: nx.DiGraph, node_id: str) -> list[str]:
    """The operand ids of ``node_id`` in port order."""
    preds = graph.in_edges(node_id, data="port")
    return [src for src, _, _ in sorted(preds, key=lambda edge: edge[2])]


def attention_node(graph: nx.DiGraph) -> tuple[str, Node]:
    """The one fused attention node (FusedAttention, LinearAttention or Nystrom) of a fused graph.

    Raises ValueError when the graph has not been through ``fuse``.
    """
    found = [(n, d["op"]) for n, d in graph.nodes(data=True)
             if isinstance(d["op"], ATTENTION_NODES)]
    if len(found) != 1:
        raise ValueError(f"expected one fused attention node, found {len(found)}; run the pipeline")
    return found[0]
