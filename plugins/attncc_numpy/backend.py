"""NumpyBackend: the tiled CPU backend's plugin class (supports, search space, compile).

Tunables: ``block_m`` and ``block_n`` (query and key tile sizes) for the fused kernel, ``chunk``
for chunked linear attention; Nyström has none. The search space lives here, next to the kernel
it tunes.
"""

from __future__ import annotations

from attncc.backends.base import SUPPORTED, Backend, SearchSpace, Support
from attncc.errors import BackendError
from attncc.ir.graph import LinearAttention, Nystrom, attention_node
from attncc_numpy.kernel import NumpyKernel
from attncc_numpy.source import describe

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
            attention_node(graph)
        except ValueError as err:
            return Support(False, f"{err} (the numpy backend compiles lowered graphs: "
                                  "attncc.passes.pipeline.lower(spec))")
        kind = getattr(target, "kind", "cpu")
        if kind not in (None, "cpu"):
            return Support(False, f"the numpy backend runs on the CPU, not on a {kind} target; "
                                  "use backend='torch' or 'triton' there")
        return SUPPORTED

    def search_space(self, graph, target) -> SearchSpace:
        spec = graph.graph["spec"]
        kind = _kind(graph)
        if kind == "nystrom":
            return SearchSpace({})
        if kind == "linear":
            return SearchSpace({"chunk": TILES})
        limit = MAX_ADDITIVE_TILE if spec.score == "additive" else MAX_TILE
        sizes = graph.graph.get("sizes") or {}

        def keep(config: dict) -> bool:
            bm, bn = config.get("block_m", 64), config.get("block_n", 64)
            if bm * bn > limit:
                return False
            # A tile more than 4x the padded sequence only adds padding work.
            for tile, seq in ((bm, sizes.get("seq_q")), (bn, sizes.get("seq_k"))):
                if seq and tile > 4 * max(16, 1 << (int(seq) - 1).bit_length()):
                    return False
            return True

        return SearchSpace({"block_m": TILES, "block_n": TILES}, keep)

    def default_config(self, graph, target) -> dict:
        kind = _kind(graph)
        if kind == "nystrom":
            return {}
        if kind == "linear":
            return {"chunk": 64}
        if graph.graph["spec"].score == "additive":
            return {"block_m": 32, "block_n": 32}
        return {"block_m": 64, "block_n": 128}

    def compile(self, graph, config: dict, target) -> NumpyKernel:
        spec = graph.graph["spec"]
        kind = _kind(graph)
        full = {**self.default_config(graph, target), **(config or {})}
        space = self.search_space(graph, target)
        unknown = sorted(set(full) - set(space.params))
        if unknown:
            raise BackendError(f"unknown tunable '{unknown[0]}' for the numpy backend "
                               f"({kind} kernel); expected: {', '.join(space.params) or 'none'}")
        for name, value in full.items():
            if not isinstance(value, int) or value < 1:
                raise BackendError(f"tunable '{name}' must be a positive integer, got {value!r}")
        return NumpyKernel(spec, full, describe(spec, kind, full), kind)


def _kind(graph) -> str:
    """fused | linear | nystrom, from the graph's attention node (or the spec before fuse)."""
    try:
        _, node = attention_node(graph)
    except ValueError:
        spec = graph.graph["spec"]
        if spec.lowrank is not None and spec.lowrank.method == "nystrom":
            return "nystrom"
        return "linear" if spec.normalize == "linear" else "fused"
    if isinstance(node, Nystrom):
        return "nystrom"
    return "linear" if isinstance(node, LinearAttention) else "fused"
