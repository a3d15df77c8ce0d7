"""The Triton Kernel: the generated module imported from its own file, called after attncc's
call prologue with attncc's block plan.

The plugin reads the generated module through one public name, ``PROGRAM`` (the host runtime's
``Program``): the kernel calls its ``attention`` (the module's entry point) with the plan's
tables; the ``torch.library`` ops (``ops.py``) call its launches.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch

from attncc.backends.autograd import autograd_backward
from attncc.backends.base import Kernel
from attncc.errors import BackendError
from attncc.lowering.prologue import prologue
from attncc.lowering.reads import Reads
from attncc.plan import PlanCache

from . import runtime
from .source import RUNTIME, RUNTIME_TEXT, generate

#: Folder the generated modules are written to (Triton's jit reads a kernel's source file).
CACHE_ENV = "ATTNCC_TRITON_CACHE"


def load_module(source: str):
    """Import ``source`` as a module from a file named by its hash (written once); its runtime
    import resolves to this plugin's ``runtime`` module (the same text, by the name's digest)."""
    sys.modules.setdefault(RUNTIME, runtime)
    name = f"attncc_triton_gen_{hashlib.sha256(source.encode()).hexdigest()[:20]}"
    if name in sys.modules:
        return sys.modules[name]
    folder = Path(os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(),
                                                            f"attncc_triton_{os.getuid()}"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    if not path.exists() or path.read_text(encoding="utf-8") != source:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source, encoding="utf-8")
        tmp.replace(path)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class TritonKernel(Kernel):
    """``kernel(q, k, v, return_lse=False, **inputs)`` on torch tensors. ``forward_source`` is
    the module loaded at compile time (a fused kernel's holds the forward kernel only);
    ``source`` the whole generated module (standalone with its ``companions``, the host
    runtime), printed on first use: reading it, or the first backward call, which loads its
    backward kernels."""

    backend = "triton"

    def __init__(self, spec, node, kind: str, config: dict, forward_source: str):
        self.spec, self.node, self.kind = spec, node, kind
        self.config = dict(config)
        self.forward_source = forward_source
        self._source = forward_source if kind == "linear" else None
        self.program = load_module(forward_source).PROGRAM
        if kind != "linear":
            self.program.backward_kernels = self._backward_kernels
        self.backward = functools.partial(autograd_backward, self)
        self.plans = (PlanCache(node, self.config["block_m"], self.config["block_n"])
                      if kind == "fused" else None)
        self._reads = Reads(node) if kind == "fused" else None
        self._tables: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @property
    def source(self) -> str:
        """The whole module: forward and backward kernels, or where a derivative cannot be
        printed the forward alone, ``SPEC["no_backward"]`` saying why."""
        if self._source is None:
            self._source = generate(self.spec, self.node, self.config)
        return self._source

    def _backward_kernels(self) -> dict:
        """The backward kernels of ``source`` (``Program.backward_kernels``); BackendError
        where the derivative cannot be printed."""
        module = load_module(self.source)
        if "bwd_dq" not in module.PROGRAM.kernels:
            raise BackendError(f"triton backend: no backward for the spec {self.spec.name!r} "
                               f"(its forward runs): {module.SPEC['no_backward']}")
        return module.PROGRAM.kernels

    def __repr__(self) -> str:
        return f"TritonKernel({self.spec.name!r}, kind={self.kind!r}, config={self.config})"

    def companions(self) -> dict[str, str]:
        return {f"{RUNTIME}.py": RUNTIME_TEXT}

    def torch_op(self):
        """The ``triton_op``s of this kernel (``ops.registered``: ``fn.op``, ``fn.args``,
        ``fn.ops``)."""
        from .ops import FusedOps, LinearOps, NystromOps, registered

        return registered(self, {"linear": LinearOps, "nystrom": NystromOps}.get(self.kind,
                                                                                FusedOps))

    def prologue(self, q, k, v, inputs: dict, return_lse: bool = False):
        """attncc's checked call (no casts: the kernels take the input dtype); the inputs'
        reads in range (``attncc.lowering.reads``: the printed kernels clamp every index)."""
        call = prologue(self.spec, self.node, q, k, v, inputs, backend="triton",
                        library="torch", return_lse=return_lse, cast=False)
        if self._reads is not None:
            self._reads.check(call.sizes, call.inputs)
        return call

    def tables(self, sizes: dict, inputs: dict, device, padded: bool = False) -> dict:
        """The block plan of a fused kernel for these sizes and (mask) inputs, as the eight
        int32 index tables on ``device`` (plans cached by ``PlanCache``, tables with their plan
        object). ``padded``: indices as wide as
        the block axis and one row per batch/head where the mask varies with them, so that the
        shapes follow from the sizes alone."""
        plan = self.plans.get(sizes, inputs)
        cached = self._tables.setdefault(plan, {})
        key = (str(device), padded)
        if key not in cached:
            tables = {}
            for t, width in (("", plan.num_kv_blocks), ("t", plan.num_q_blocks)):
                for name, attr in (("fc", "full_counts"), ("fi", "full_index"),
                                   ("pc", "partial_counts"), ("pi", "partial_index")):
                    a = getattr(plan, attr + ("_t" if t else ""))
                    if padded and name.endswith("i"):  # zeros after the valid entries
                        a = np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])])
                    tables[name + t] = torch.from_numpy(a.copy()).to(device)
            cached[key] = tables
        return cached[key]

    def __call__(self, q, k, v, *, return_lse: bool = False, stats=(), **inputs):
        if stats:  # per-row statistics: Kernel.call_with_stats (attncc.lowering.maps)
            return self.call_with_stats(q, k, v, stats, return_lse, inputs)
        call = self.prologue(q, k, v, inputs, return_lse)
        tables = (self.tables(call.sizes, call.raw_inputs, q.device) if self.kind == "fused"
                  else None)
        return self.program.attention(call.q, call.k, call.v, return_lse, tables, call.inputs)

