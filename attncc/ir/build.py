"""Spec -> IR: the unfused chain of typed nodes that the passes start from (DESIGN §4).

Node ids are stable and readable: ``q``, ``k``, ``v``, one per runtime input under the input's own
name, then the computation:

- softmax-style (dot or additive score, softmax / sigmoid / topk):
  ``[k_proj, v_proj]`` (linformer) or ``[k_mem, v_mem]`` (memory tokens), ``score``,
  ``[score_mod]``, ``[mask]``, ``normalize``, ``aggregate``, ``out``;
- linear attention: ``phi_q``, ``phi_k``, ``aggregate`` (a ``LinearAggregate``), ``out``;
- Nyström: ``nystrom``, ``out``.

An input that no part of the computation reads gets no node. A compute id that an input already
uses gets a ``_`` suffix (inputs keep their names).
"""

from __future__ import annotations

import networkx as nx
import sympy

from attncc.analysis.dropped import split_dropped
from attncc.ir.graph import (
    Aggregate,
    FeatureMap,
    Input,
    LinearAggregate,
    LowRankProject,
    Mask,
    MemoryConcat,
    Normalize,
    Nystrom,
    Output,
    Score,
    ScoreMod,
    add,
    new_graph,
)
from attncc.spec import symbols
from attncc.spec.load import load_spec
from attncc.spec.symbols import free_names

__all__ = ["build"]


def build(spec) -> nx.DiGraph:
    """The IR graph of ``spec`` (anything ``load_spec`` takes), before any pass."""
    spec = load_spec(spec)
    return _Builder(spec).run()


class _Builder:
    def __init__(self, spec):
        self.spec = spec
        self.graph = new_graph(spec)

    def run(self) -> nx.DiGraph:
        spec = self.spec
        for role in ("q", "k", "v"):
            add(self.graph, role, Input(name=role, role=role))
        for name in sorted(self._read_inputs()):
            add(self.graph, name, Input(name=name, role="input", dtype=spec.inputs[name].dtype))
        if spec.normalize == "linear":
            result = self.linear()
        elif spec.lowrank is not None and spec.lowrank.method == "nystrom":
            result = self.node("nystrom", Nystrom(landmarks=spec.lowrank.size, scale=spec.scale),
                               "q", "k", "v")
        else:
            result = self.softmax_style()
        self.node("out", Output(), result)
        return self.graph

    def _read_inputs(self) -> set[str]:
        """Names of the spec inputs the computation reads: implied ones and those in expressions."""
        spec = self.spec
        names = {name for name, decl in spec.inputs.items() if decl.implied}
        for expr in (spec.score_mod, spec.mask):
            if expr is not None:
                names |= free_names(expr) & set(spec.inputs)
        return names

    def node(self, base: str, op, *operands: str) -> str:
        node_id = base
        while node_id in self.graph:
            node_id += "_"
        return add(self.graph, node_id, op, *operands)

    def expr_inputs(self, expr) -> list[str]:
        return sorted(free_names(expr) & set(self.spec.inputs))

    def softmax_style(self) -> str:
        spec = self.spec
        k, v = "k", "v"
        if spec.lowrank is not None:
            rank = spec.lowrank.size
            k = self.node("k_proj", LowRankProject(rank=rank), "k", "E")
            v = self.node("v_proj", LowRankProject(rank=rank), "v", "F")
        if spec.memory_tokens:
            k = self.node("k_mem", MemoryConcat(tokens=spec.memory_tokens), "k", "mem_k")
            v = self.node("v_mem", MemoryConcat(tokens=spec.memory_tokens), "v", "mem_v")
        if spec.score == "additive":
            scores = self.node("score", Score(kind="additive", scale=sympy.Integer(1)),
                               "q", k, "w")
        else:
            scores = self.node("score", Score(kind="dot", scale=spec.scale), "q", k)
        score_mod, mask = spec.score_mod, spec.mask
        if score_mod is not None and spec.lowrank is None:  # where(c, x, -inf): x, mask c
            score_mod, keep = split_dropped(score_mod)
            mask = keep if mask is None else sympy.And(mask, keep)
            mask = None if mask is sympy.true else mask
            score_mod = None if score_mod == symbols.score else score_mod
        if score_mod is not None:
            scores = self.node("score_mod", ScoreMod(expr=score_mod), scores,
                               *self.expr_inputs(score_mod))
        if mask is not None:
            scores = self.node("mask", Mask(expr=mask), scores, *self.expr_inputs(mask))
        weights = self.node("normalize", Normalize(kind=spec.normalize, topk=spec.topk), scores)
        return self.node("aggregate", Aggregate(), weights, v)

    def linear(self) -> str:
        spec = self.spec
        extra = ("omega",) if spec.feature_map == "performer" else ()
        fmap = FeatureMap(kind=spec.feature_map, features=spec.features)
        phi_q = self.node("phi_q", fmap, "q", *extra)
        phi_k = self.node("phi_k", fmap, "k", *extra)
        return self.node("aggregate", LinearAggregate(causal=spec.is_causal), phi_q,
                         phi_k, "v")
