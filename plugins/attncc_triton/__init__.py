"""Triton backend: fused attention kernels generated from the IR, forward and backward.

Registered as the ``triton`` entry point of ``attncc.backends``. ``compile`` writes one module per
(spec, config) (``source.py``): the fused forward, dq and dk/dv kernels with the score_mod and
mask printed inline (``printer.py``, ``fused.py``), or the chunked linear-attention kernels
(``linear.py``); it imports the host code, ``runtime.py``, as a sibling module. The kernel
(``kernel.py``) calls it with attncc's block plan; ``Kernel.torch_op`` gives its
``torch.library.triton_op``s (``ops.py``). On a machine without a GPU it
runs under ``TRITON_INTERPRET=1`` (slow; for tests).
"""

from __future__ import annotations

from attncc.backends.base import SUPPORTED, Backend, SearchSpace, Support, lowered_node
from attncc.backends.config import full_config

from .kernel import TritonKernel
from .runtime import interpreted
from .source import generate
from .space import default_config, search_space

__all__ = ["TritonBackend", "TritonKernel"]


def _kind(graph) -> tuple[str, object]:
    return lowered_node(graph, "triton", "fused")


def interpreter_problem() -> str:
    """Why interpreted kernels cannot run here ("" when they can).

    Triton decorates its own library helpers (the reductions' combine functions) when it is
    imported, so TRITON_INTERPRET=1 must be set before ``import triton``, not only before launch.
    """
    if not interpreted():
        return ("Triton needs a CUDA GPU; on CPU set TRITON_INTERPRET=1 (interpreted, slow) "
                "before importing triton")
    import triton.language.standard as standard
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(standard.zeros_like, InterpretedFunction):
        return ("TRITON_INTERPRET=1 was set after triton was imported; set it before the first "
                "'import triton' (e.g. in the environment)")
    return ""


class TritonBackend(Backend):
    """Generated Triton kernels on CUDA; on CPU only under TRITON_INTERPRET=1."""

    name = "triton"
    version = "1"

    def supports(self, graph, target) -> Support:
        try:
            import torch
            import triton  # noqa: F401
        except ImportError as err:
            return Support(False, f"triton backend needs torch and triton installed ({err})")
        kind = getattr(target, "kind", "cpu")
        if kind == "cuda" and not torch.cuda.is_available():
            return Support(False, "torch sees no CUDA device here; use a cpu target")
        if kind == "cpu" and interpreter_problem():
            return Support(False, interpreter_problem())
        spec = graph.graph["spec"]
        kind_, node = _kind(graph)
        if kind_ == "fused" and node.topk is not None and node.topk > 128:
            return Support(False, f"triton backend: top-k supports K <= 128, got {node.topk}")
        if kind_ == "linear" and spec.mask is not None and not getattr(node, "causal", False):
            return Support(False, "triton backend: linear attention with a mask other than "
                                  "causal")
        return SUPPORTED

    def search_space(self, graph, target) -> SearchSpace:
        return search_space(graph.graph["spec"], _kind(graph)[0], target,
                            graph.graph.get("dtype"))

    def default_config(self, graph, target) -> dict:
        return default_config(graph.graph["spec"], _kind(graph)[0], target,
                              graph.graph.get("dtype"))

    def compile(self, graph, config, target) -> TritonKernel:
        kind, node = _kind(graph)
        full = full_config(self, graph, target, config,
                           why="block_n below the top-k K, or tiles too big for its shared "
                               "memory")
        spec = graph.graph["spec"]
        return TritonKernel(spec, node, kind, full, generate(spec, node, full, backward=False))

    def priority(self, target) -> int:
        return 30 if getattr(target, "kind", "cpu") == "cuda" else -1
