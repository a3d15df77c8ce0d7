"""Tiled NumPy backend (CPU): flash-style online softmax over the block plan.

Registered under the entry-point group ``attncc.backends`` as ``numpy``, exactly as an outside
plugin would be. ``NumpyBackend`` (here) holds the contract, ``kernel.NumpyKernel`` a call.
Tunables: ``block_m`` and ``block_n`` (query and key tile sizes) for the fused kernel, ``chunk``
for chunked linear attention; Nyström has none. The search space lives here, next to the kernel
it tunes. Everything is read from the graph's attention node; the path is the first of the
``strategy`` pass's lowering paths (``node.lowering``) that this backend implements (``PATHS``).
"""

from __future__ import annotations

from attncc.backends.base import SUPPORTED, Backend, SearchSpace, Support
from attncc.backends.config import full_config
from attncc.ir.graph import attention_node
from attncc_numpy.kernel import NumpyKernel

__all__ = ["NumpyBackend", "NumpyKernel"]

#: The lowering paths this backend implements: the fused tile loop, the chunked linear scan and
#: Nyström.
PATHS = ("tiles", "scan", "nystrom")
TILES = (16, 32, 64, 128, 256)
#: Largest score tile (rows x cols) kept by the search space; for additive scores the tile also
#: holds a head_dim axis, so its limit is smaller.
MAX_TILE = 256 * 256
MAX_ADDITIVE_TILE = 64 * 64


class NumpyBackend(Backend):
    """Flash-style tiled attention in NumPy over the block plan (CPU, no gradients)."""

    name = "numpy"
    version = "1"
    library = "numpy"

    def supports(self, graph, target) -> Support:
        try:
            _node(graph)
        except ValueError as err:
            return Support(False, f"{err} (the numpy backend compiles lowered graphs: "
                                  "attncc.passes.pipeline.lower(spec))")
        kind = getattr(target, "kind", "cpu")
        if kind not in (None, "cpu"):
            return Support(False, f"the numpy backend runs on the CPU, not on a {kind} target; "
                                  "use backend='torch' or 'triton' there")
        return SUPPORTED

    def search_space(self, graph, target) -> SearchSpace:
        node, path = _node(graph)
        if path == "nystrom":
            return SearchSpace({})
        if path == "scan":
            return SearchSpace({"chunk": TILES})
        limit = MAX_ADDITIVE_TILE if node.score == "additive" else MAX_TILE
        sizes = graph.graph.get("sizes") or {}

        def fits(config: dict) -> bool:
            return config.get("block_m", 64) * config.get("block_n", 64) <= limit

        def keep(config: dict) -> bool:
            # A tile more than 4x the padded sequence only adds padding work.
            for tile, seq in ((config.get("block_m", 64), sizes.get("seq_q")),
                              (config.get("block_n", 64), sizes.get("seq_k"))):
                if seq and tile > 4 * max(16, 1 << (int(seq) - 1).bit_length()):
                    return False
            return fits(config)

        return SearchSpace({"block_m": TILES, "block_n": TILES}, keep, valid=fits)

    def default_config(self, graph, target) -> dict:
        node, path = _node(graph)
        if path == "nystrom":
            return {}
        if path == "scan":
            return {"chunk": 64}
        if node.score == "additive":
            return {"block_m": 32, "block_n": 32}
        return {"block_m": 64, "block_n": 128}

    def compile(self, graph, config: dict, target) -> NumpyKernel:
        full = full_config(self, graph, target, config,
                           why="the score tile block_m x block_n is too large")
        return NumpyKernel(graph.graph["spec"], *_node(graph), full)


def _node(graph):
    """The attention node and the path that lowers it (one of ``PATHS``); ValueError when the
    graph has no lowered attention node."""
    _, node = attention_node(graph)
    if node.lowering is None:
        raise ValueError(f"the {node.op_name} node has no lowering paths (the strategy pass "
                         "has not run)")
    return node, next(p.name for p in node.lowering.paths if p.ok and p.name in PATHS)
