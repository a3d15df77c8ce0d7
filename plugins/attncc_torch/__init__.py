"""PyTorch backend: block-plan gathers and batched matmuls, CPU and CUDA, with autograd.

Registered as the ``torch`` entry point of ``attncc.backends``. ``compile`` turns a fused graph into
a ``TorchKernel`` that reads the graph's one attention node: FusedAttention -> fused SDPA calls
where its ``lowering`` allows them, else the flash pattern over the block plan (``flash.py``);
LinearAttention -> chunked prefix sums (``linear.py``); Nystrom -> the shared landmark products.
"""

from __future__ import annotations

import torch

from attncc.backends.base import SUPPORTED, Backend, SearchSpace, Support
from attncc.backends.config import full_config
from attncc.errors import BackendError
from attncc.ir.graph import LinearAttention, Nystrom, attention_node

from .kernel import TorchKernel
from .space import default_config, search_space

__all__ = ["TorchBackend", "TorchKernel"]

_KINDS = {LinearAttention: "linear", Nystrom: "nystrom"}


def _node(graph):
    """``(attention node, lowering kind)``: flash, linear or nystrom by node type."""
    try:
        _, node = attention_node(graph)
    except ValueError as err:
        raise BackendError(f"torch backend: {err}") from None
    return node, _KINDS.get(type(node), "flash")


class TorchBackend(Backend):
    """PyTorch kernels for every spec: float32/float16/bfloat16/float64 on CPU and CUDA."""

    name = "torch"
    version = "1"

    def supports(self, graph, target) -> Support:
        kind = getattr(target, "kind", "cpu") if target is not None else "cpu"
        if kind == "cuda" and not torch.cuda.is_available():
            return Support(False, "torch sees no CUDA device here; use a cpu target")
        if kind not in ("cpu", "cuda"):
            return Support(False, f"torch backend runs on cpu or cuda targets, not {kind!r}")
        _node(graph)
        return SUPPORTED

    def search_space(self, graph, target) -> SearchSpace:
        node, kind = _node(graph)
        return search_space(node, kind, target, graph.graph.get("sizes"))

    def default_config(self, graph, target) -> dict:
        node, kind = _node(graph)
        return default_config(node, kind, target)

    def compile(self, graph, config, target) -> TorchKernel:
        full = full_config(self, graph, target, config,
                           why="use_sdpa needs a dot-product softmax spec; block_m * block_n * "
                               "kv_chunk must stay within tile_elems, at most 2**24 on CPU")
        return TorchKernel(graph, *_node(graph), full)

    def priority(self, target) -> int:
        return 20 if getattr(target, "kind", "cpu") == "cuda" else 10
