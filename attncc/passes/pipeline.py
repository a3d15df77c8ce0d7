"""The pipeline: spec -> IR -> the passes below, in this order, up to the lowering decision
(DESIGN §4)."""

from __future__ import annotations

import networkx as nx

from attncc.ir.build import build
from attncc.ir.verify import verify as verify_graph
from attncc.passes.cost import Cost
from attncc.passes.fuse import Fuse
from attncc.passes.masks import Masks
from attncc.passes.shapes import Shapes
from attncc.passes.strategy import Strategy

__all__ = ["PIPELINE", "lower"]

PIPELINE = [
    Shapes(),  # every node gets a symbolic shape over the sizes
    Masks(),   # the Mask node learns which inputs it reads and whether it varies with b, h
    Fuse(),    # score -> mod -> mask -> normalize -> aggregate becomes one FusedAttention
    Cost(),    # FLOPs and bytes as formulas of the sizes and the mask density
    Strategy(),  # the lowering paths that serve the attention node (sdpa, runs, tiles, ...), why
]


def lower(spec, verify: bool = False) -> nx.DiGraph:
    """Build the IR of ``spec`` (anything ``load_spec`` takes) and run every pass of PIPELINE.

    With ``verify``, ``verify()`` checks the graph after the build and after each pass.
    """
    graph = build(spec)
    if verify:
        verify_graph(graph)
    for stage in PIPELINE:
        graph = stage.apply(graph)
        if verify:
            verify_graph(graph)
    return graph
