"""The NumPy kernel: the shared call prologue, the block plan, then the node's lowering.

Float16 and float32 inputs are computed in float32, float64 in float64
(``attncc.lowering.prologue``); the output comes back in the input dtype, the lse in the compute
dtype. Inputs must be NumPy arrays.
"""

from __future__ import annotations

from attncc.backends.base import Kernel
from attncc.lowering.lowrank import linformer, nystrom
from attncc.lowering.prologue import prologue
from attncc.plan import PlanCache
from attncc_numpy.linear import run_linear
from attncc_numpy.tiles import Stats, TileScorer, run_fused

DTYPES = ("float16", "float32", "float64")


class NumpyKernel(Kernel):
    """``kernel(q, k, v, return_lse=False, **inputs)`` on NumPy arrays; see the module docstring.

    ``node`` is the graph's attention node, ``path`` its lowering (tiles | scan | nystrom).
    ``last_plan`` and ``last_stats`` (FULL and PARTIAL tiles visited) describe the latest call.
    """

    backend = "numpy"
    backward = None

    def __init__(self, spec, node, path: str, config: dict, source: str):
        self.spec = spec
        self.node = node
        self.path = path
        self.config = dict(config)
        self.source = source
        self.last_plan = None
        self.last_stats = Stats()
        self._plans = (PlanCache(node, config["block_m"], config["block_n"])
                       if path == "tiles" else None)

    def __repr__(self) -> str:
        return f"NumpyKernel({self.spec.name!r}, {self.path}, config={self.config})"

    def __call__(self, q, k, v, *, return_lse: bool = False, **inputs):
        node = self.node
        call = prologue(self.spec, node, q, k, v, inputs, backend="numpy", library="numpy",
                        dtypes=DTYPES, return_lse=return_lse)
        lse = None
        if self.path == "scan":
            out = run_linear(node, call.q, call.k, call.v, call.inputs, self.config["chunk"])
        elif self.path == "nystrom":
            out = nystrom(call.q, call.k, call.v, node.landmarks, call.scale)
        else:
            k_c, v_c = call.k, call.v
            if node.projection is not None:
                k_c, v_c = linformer(k_c, v_c, call.inputs["E"], call.inputs["F"])
            plan = self._plans.get(call.sizes, call.raw_inputs)
            stats = Stats()
            scorer = TileScorer(node, call.sizes, call.inputs, call.scale, call.compute,
                                plan.block_n)
            out, lse = run_fused(node, plan, scorer, call.q, k_c, v_c, stats)
            self.last_plan, self.last_stats = plan, stats
        out = out.astype(call.dtype, copy=False)
        return (out, lse) if return_lse else out
