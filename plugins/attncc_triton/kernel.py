"""The Triton Kernel: the generated module imported from its own file, called with attncc's
checks and attncc's block plan."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import torch

from attncc.backends.autograd import autograd_backward
from attncc.backends.base import Kernel
from attncc.bind import bind
from attncc.errors import InputError
from attncc.plan import build_plan

from . import linear

#: Folder the generated modules are written to (Triton's jit reads a kernel's source file).
CACHE_ENV = "ATTNCC_TRITON_CACHE"


def _cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(),
                                                      f"attncc_triton_{os.getuid()}")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_module(source: str):
    """Import ``source`` as a module from a file named by its hash (written once)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    name = f"attncc_triton_gen_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    path = _cache_dir() / f"{name}.py"
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
    """``kernel(q, k, v, return_lse=False, **inputs)`` on torch tensors; ``source`` is the
    standalone generated module."""

    backend = "triton"

    def __init__(self, spec, kind: str, config: dict, source: str):
        self.spec = spec
        self.kind = kind
        self.config = dict(config)
        self.source = source
        self.module = load_module(source)
        self.backward = functools.partial(autograd_backward, self)

    def __repr__(self) -> str:
        return f"TritonKernel({self.spec.name!r}, kind={self.kind!r}, config={self.config})"

    def __call__(self, q, k, v, *, return_lse: bool = False, **inputs):
        spec = self.spec
        for name, x in (("q", q), ("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor):
                raise InputError(f"{name}: the triton backend expects a torch.Tensor, got "
                                 f"{type(x).__name__}")
        bound = bind(spec, q, k, v, inputs)
        lse_ok = spec.normalize in ("softmax", "topk") and self.kind == "fused"
        if return_lse and not lse_ok:
            raise InputError(f"return_lse: the log-sum-exp exists for normalize softmax and topk "
                             f"(not nystrom); this spec is {spec.normalize} ({self.kind})")
        tables = None
        if self.kind == "fused":
            plan = build_plan(spec, bound.sizes, self.config["block_m"], self.config["block_n"],
                              inputs=bound.inputs)
            tables = _tables(plan, q.device)
        return self.module.attention(q, k, v, return_lse=return_lse, tables=tables,
                                     **bound.inputs)

    # linear attention's pieces, as torch ops and launches through ``wrap`` (for triton_ops) --
    def features(self, x, omega=None):
        """φ(x), the spec's feature map (torch, differentiable); ``omega`` for performer."""
        return self.module._features(self.module.SPEC, x, omega)

    def features_vjp(self, x, omega, d_phi):
        """``(dx, d_omega or None)`` of ``features`` for the gradient ``d_phi``."""
        return linear.features_vjp(self.module.SPEC["feature_map"], x, omega, d_phi)

    def denominator(self, phi_q, phi_k):
        """``(B, H, Nq)`` row sums ``Σ_j φq_i·φk_j`` the linear kernel divides by."""
        return linear.denominator(phi_q, phi_k, self.module.SPEC["causal"])

    def linear_forward(self, phi_q, phi_k, v, wrap=None):
        """The linear kernel's output (one launch through ``wrap``; not differentiable)."""
        return linear.launch_linear(self.module, self.config, phi_q, phi_k, v, wrap)

    def linear_backward(self, phi_q, phi_k, v, d_num, d_den, wrap=None):
        """``(dφq, dφk, dv)`` of the linear kernel from the gradients of its numerator and
        denominator (one launch through ``wrap``)."""
        return linear.launch_linear_backward(self.module, self.config, phi_q, phi_k, v, d_num,
                                             d_den, wrap)


def _tables(plan, device) -> dict:
    """attncc's BlockPlan as the generated module's eight int32 tables."""
    arrays = {"fc": plan.full_counts, "fi": plan.full_index, "pc": plan.partial_counts,
              "pi": plan.partial_index, "fct": plan.full_counts_t, "fit": plan.full_index_t,
              "pct": plan.partial_counts_t, "pit": plan.partial_index_t}
    return {n: torch.from_numpy(a.copy()).to(device) for n, a in arrays.items()}
