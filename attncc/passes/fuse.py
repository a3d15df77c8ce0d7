"""The ``fuse`` pass: the attention chain becomes one node that never materializes the scores.

- ``Score -> [ScoreMod] -> [Mask] -> Normalize -> Aggregate`` (with the ``MemoryConcat`` nodes on
  k and v) becomes ``FusedAttention(q, k, v, inputs...)`` — the flash pattern. The Mask node object
  (with what the ``masks`` pass filled in) is embedded as the node's ``mask``.
- ``FeatureMap(q), FeatureMap(k) -> LinearAggregate`` becomes ``LinearAttention(q, k, v[, omega])``.
- ``Nystrom`` and ``LowRankProject`` stay: the projections feed the fused node's k and v, and
  the fused node's ``projection`` records their rank (the number of keys).

The fused node is named ``attention``; its operands are q, k, v (after any projection) and then the
runtime inputs it reads, sorted by node id. Its shape is the shape of the node it replaces.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from attncc.ir.graph import (
    Aggregate,
    FeatureMap,
    FusedAttention,
    LinearAggregate,
    LinearAttention,
    LowRankProject,
    Mask,
    MemoryConcat,
    Normalize,
    Score,
    ScoreMod,
    add,
    derive,
    op,
    operands,
)
from attncc.ir.verify import IRError

__all__ = ["Fuse"]


@dataclass(frozen=True)
class Fuse:
    """Replace each attention chain by one FusedAttention or LinearAttention node."""

    name: str = "fuse"

    def apply(self, graph: nx.DiGraph) -> nx.DiGraph:
        result = derive(graph, self.name)
        for node_id in sorted(graph.nodes):
            node = op(graph, node_id)
            if isinstance(node, Aggregate):
                _fuse_softmax(result, node_id)
            elif isinstance(node, LinearAggregate):
                _fuse_linear(result, node_id)
        return result


def _expect(graph: nx.DiGraph, node_id: str, kinds: tuple[type, ...], reader: str) -> None:
    node = op(graph, node_id)
    if not isinstance(node, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise IRError(f"fuse: '{reader}' reads '{node_id}' ({node.op_name}), expected {names}")


def _fuse_softmax(graph: nx.DiGraph, aggregate: str) -> None:
    weights, v = operands(graph, aggregate)
    _expect(graph, weights, (Normalize,), aggregate)
    chain = [aggregate, weights]
    (scores,) = operands(graph, weights)
    extras: list[str] = []
    score_mod = mask = None
    while not isinstance(op(graph, scores), Score):
        _expect(graph, scores, (Mask, ScoreMod), chain[-1])
        node = op(graph, scores)
        if isinstance(node, Mask):
            mask = node
        else:
            score_mod = node.expr
        chain.append(scores)
        scores, *reads = operands(graph, scores)
        extras += reads
    chain.append(scores)
    q, k, *reads = operands(graph, scores)
    extras += reads
    score = op(graph, scores)
    tokens = 0
    kv = []
    for x in (k, v):
        if isinstance(op(graph, x), MemoryConcat):
            tokens = op(graph, x).tokens
            chain.append(x)
            x, mem = operands(graph, x)
            extras.append(mem)
        kv.append(x)
    keys = op(graph, kv[0])
    projection = keys.rank if isinstance(keys, LowRankProject) else None
    norm = op(graph, weights)
    fused = FusedAttention(score=score.kind, scale=score.scale, score_mod=score_mod, mask=mask,
                           normalize=norm.kind, topk=norm.topk, memory_tokens=tokens,
                           projection=projection, shape=op(graph, aggregate).shape)
    _replace(graph, chain, fused, [q, *kv, *sorted(set(extras))])


def _fuse_linear(graph: nx.DiGraph, aggregate: str) -> None:
    phi_q, phi_k, v = operands(graph, aggregate)
    for phi in (phi_q, phi_k):
        _expect(graph, phi, (FeatureMap,), aggregate)
    (q, *extra_q), (k, *extra_k) = operands(graph, phi_q), operands(graph, phi_k)
    fmap = op(graph, phi_q)
    if (op(graph, phi_k).kind, op(graph, phi_k).features) != (fmap.kind, fmap.features):
        raise IRError(f"fuse: '{phi_q}' and '{phi_k}' apply different feature maps")
    node = LinearAttention(feature_map=fmap.kind, features=fmap.features,
                           causal=op(graph, aggregate).causal, shape=op(graph, aggregate).shape)
    _replace(graph, [aggregate, phi_q, phi_k], node, [q, k, v, *sorted(set(extra_q + extra_k))])


def _replace(graph: nx.DiGraph, chain: list[str], node, args: list[str]) -> None:
    """Put ``node`` (reading ``args``) where ``chain[0]`` was; drop the chain's nodes.

    Every other chain node must be read only inside the chain, else fusing would lose a value.
    """
    inside = set(chain)
    for member in chain[1:]:
        outside = set(graph.successors(member)) - inside
        if outside:
            raise IRError(f"fuse: '{member}' is also read by {sorted(outside)}; cannot fuse it")
    node_id = "attention"
    while node_id in graph:
        node_id += "_"
    add(graph, node_id, node, *args)
    for _, dst, port in list(graph.out_edges(chain[0], data="port")):
        graph.add_edge(node_id, dst, port=port)
    graph.remove_nodes_from(chain)
