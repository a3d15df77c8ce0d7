"""The NumPy kernel: checks a call, builds (or reuses) the block plan, and runs the lowering.

Float16 and float32 inputs are computed in float32, float64 in float64; the output comes back in
the input dtype, the lse in the compute dtype. Inputs must be NumPy arrays.
"""

from __future__ import annotations

import numpy as np

from attncc.backends.base import Kernel
from attncc.bind import bind
from attncc.errors import InputError
from attncc_numpy.fused import Stats, run_fused
from attncc_numpy.linear import run_linear
from attncc_numpy.nystrom import run_nystrom
from attncc_numpy.tiles import TileScorer

COMPUTE = {np.dtype(np.float16): np.dtype(np.float32), np.dtype(np.float32): np.dtype(np.float32),
           np.dtype(np.float64): np.dtype(np.float64)}


class NumpyKernel(Kernel):
    """``kernel(q, k, v, return_lse=False, **inputs)`` on NumPy arrays; see the module docstring.

    ``last_plan`` and ``last_stats`` (FULL and PARTIAL tiles visited) describe the latest call.
    """

    backend = "numpy"
    backward = None

    def __init__(self, spec, config: dict, source: str, kind: str):
        self.spec = spec
        self.config = dict(config)
        self.source = source
        self.kind = kind  # fused | linear | nystrom
        self.last_plan = None
        self.last_stats = Stats()

    def __repr__(self) -> str:
        return f"NumpyKernel({self.spec.name!r}, {self.kind}, config={self.config})"

    def __call__(self, q, k, v, *, return_lse: bool = False, **inputs):
        spec = self.spec
        for name, x in (("q", q), ("k", k), ("v", v), *inputs.items()):
            if x is not None and not isinstance(x, np.ndarray):
                raise InputError(f"{name}: the numpy backend takes NumPy arrays, got "
                                 f"{type(x).__module__}.{type(x).__name__}; convert it (e.g. "
                                 "x.numpy()) or compile with backend='torch'")
        bound = bind(spec, q, k, v, inputs)
        if q.dtype not in COMPUTE:
            raise InputError(f"q: the numpy backend computes float16, float32 and float64, got "
                             f"{q.dtype}")
        if return_lse and (spec.normalize not in ("softmax", "topk") or self.kind != "fused"):
            what = "nystrom" if self.kind == "nystrom" else f"normalize {spec.normalize}"
            raise InputError(f"return_lse: the log-sum-exp exists for normalize softmax and topk "
                             f"(not low-rank nystrom); this spec has {what}")
        ct = COMPUTE[q.dtype]
        q_c, k_c, v_c = (x.astype(ct, copy=False) for x in (q, k, v))
        ins = {n: (x.astype(ct, copy=False) if spec.inputs[n].is_float else x)
               for n, x in bound.inputs.items()}
        lse = None
        if self.kind == "linear":
            out = run_linear(spec, q_c, k_c, v_c, ins, self.config["chunk"])
        elif self.kind == "nystrom":
            out = run_nystrom(spec, q_c, k_c, v_c, bound.scale)
        else:
            if spec.lowrank is not None:
                k_c, v_c = ins["E"] @ k_c, ins["F"] @ v_c
            plan = self._plan(bound)
            stats = Stats()
            scorer = TileScorer(spec, bound.sizes, ins, bound.scale, ct)
            out, lse = run_fused(spec, plan, scorer, q_c, k_c, v_c, ins, stats)
            self.last_plan, self.last_stats = plan, stats
        out = out.astype(q.dtype, copy=False)
        return (out, lse) if return_lse else out

    def _plan(self, bound):
        from attncc.plan import build_plan  # cached there per sizes for index-only masks

        return build_plan(self.spec, bound.sizes, self.config["block_m"], self.config["block_n"],
                          bound.inputs)
