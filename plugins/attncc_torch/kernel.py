"""The torch Kernel: check a call, pick the lowering path, run it in float32/float64, cast back.

Paths, read from the fused node (``node.lowering``, the ``strategy`` pass) and the config:
``sdpa`` (the whole call is one ``scaled_dot_product_attention``), ``runs`` (CPU forward without
gradients: fused calls over runs of key blocks, ``runs.py``), and the flash pattern over the block
plan (``flash.py``; softmax, sigmoid, top-k, Linformer after its projection); LinearAttention and
Nystrom run the shared recipes (``attncc.lowering``). Half types compute in float32 and return in
their own dtype; autograd works through all of them (a custom Function for flash, torch's own for
the rest).
"""

from __future__ import annotations

import functools
import weakref

import sympy
import torch
import torch.nn.functional as F  # noqa: N812 - the name torch code uses

from attncc.backends.autograd import autograd_backward
from attncc.backends.base import Kernel
from attncc.lowering.env import merge_heads, split_heads
from attncc.lowering.features import linear_attention
from attncc.lowering.lowrank import linformer, nystrom
from attncc.lowering.prologue import prologue
from attncc.plan import PlanCache

from .flash import FlashAttention
from .runs import RunsForward
from .schedule import build_schedule
from .source import describe
from .tiles import Problem


class TorchKernel(Kernel):
    """``kernel(q, k, v, return_lse=False, **inputs)`` on torch tensors (CPU or CUDA).

    Built from a fused graph: ``node`` is its attention node, what the kernel computes; the
    spec only checks calls (its input declarations). Block plans are cached per kernel by a
    ``PlanCache`` (per sizes and mask-input content); the schedules and runners derived from a
    plan are cached with that plan object (weakly keyed: they go when the cache drops it).
    """

    backend = "torch"

    def __init__(self, graph, node, kind: str, config: dict):
        self.spec = graph.graph["spec"]
        self.node, self.kind, self.config = node, kind, dict(config)
        self.source = describe(self.spec, node, kind, self.config)
        self.backward = functools.partial(autograd_backward, self)
        if kind != "flash":
            return
        # the Linformer matrices that project k and v (the schema names them E and F)
        self._projection = ("E", "F") if node.projection is not None else ()
        fused = self.config["use_sdpa"]
        self._sdpa = fused and node.lowering.allows("sdpa")
        self._runs = fused and node.lowering.allows("runs")
        self._drop = sympy.Not(node.mask.expr) if node.mask is not None else None
        self._plans = PlanCache(node, self.config["block_m"], self.config["block_n"])
        self._derived: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"TorchKernel({self.spec.name!r}, kind={self.kind!r}, config={self.config})"

    def __call__(self, q, k, v, *, return_lse: bool = False, **inputs):
        call = prologue(self.spec, self.node, q, k, v, inputs, backend="torch",
                        library="torch", return_lse=return_lse)
        node = self.node
        if self.kind == "linear":
            out = linear_attention(node.feature_map, call.q, call.k, call.v,
                                   call.inputs.get("omega"), causal=node.causal,
                                   chunk=self.config["chunk"])
            return out.to(call.dtype)
        if self.kind == "nystrom":
            out = nystrom(call.q, call.k, call.v, node.landmarks, call.scale, exact_pinv=False)
            return out.to(call.dtype)
        if self._sdpa and not return_lse and call.group == 1:
            return F.scaled_dot_product_attention(q, k, v, is_causal=node.mask is not None,
                                                  scale=call.scale)
        k, v = call.k, call.v
        if self._projection:
            k, v = linformer(k, v, *(call.inputs[n] for n in self._projection))
        plan = self._plans.get(call.sizes, call.raw_inputs)
        runs = self._runs_ok(call)
        key = (runs, *sorted(call.sizes.items()), str(q.device))  # a plan serves many sizes
        if runs:
            runner = self._derive(plan, key, lambda: RunsForward(
                node, plan, call.sizes, call.inputs, q.device))
            out, lse = runner(call.q, k, v, call.scale)
        else:
            out, lse = self._flash(plan, key, call, k, v)
        if return_lse:
            return out.to(call.dtype), lse.to(call.dtype)
        return out.to(call.dtype)

    def _flash(self, plan, key: tuple, call, k, v):
        cfg, sizes, q = self.config, call.sizes, call.q
        schedule = self._derive(plan, key, lambda: build_schedule(
            plan, sizes["batch"], sizes["kv_heads"], call.group, kv_chunk=cfg["kv_chunk"],
            group_blocks=cfg["group_blocks"], tile_elems=cfg["tile_elems"],
            value_cost=sizes["head_dim"] if self.node.score == "additive" else 1,
            memory=bool(self.node.memory_tokens), device=q.device))
        ins = call.inputs
        names = tuple(n for n, x in ins.items()
                      if x.is_floating_point() and n not in self._projection)
        ints = {n: x for n, x in ins.items() if not x.is_floating_point()}
        pb = Problem(self.node, self._drop, sizes, ints, call.scale, plan, k.shape[2], schedule,
                     q.device)
        out5, lse5 = FlashAttention.apply(pb, names, split_heads(q, k.shape[1]), k, v,
                                          *(ins[n] for n in names))
        return merge_heads(out5), (merge_heads(lse5)[..., 0] if lse5.numel() else None)

    def _runs_ok(self, call) -> bool:
        """Whether the fused-runs forward (``runs.py``) serves this call: the node's lowering
        allows it, ``use_sdpa`` asks for it, CPU tensors, no GQA (it would copy keys per query
        head), equal q/v head sizes, and no gradient wanted."""
        q, k, v = call.q, call.k, call.v
        if not self._runs or q.device.type != "cpu" or v.shape[-1] != q.shape[-1] or call.group > 1:
            return False
        tensors = (q, k, v, *(x for x in call.inputs.values() if x.is_floating_point()))
        return not (torch.is_grad_enabled() and any(x.requires_grad for x in tensors))

    def _derive(self, plan, key, build):
        """``build()``, cached with ``plan`` (dropped when the plan is): schedules, runners."""
        derived = self._derived.setdefault(plan, {})
        if key not in derived:
            derived[key] = build()
        return derived[key]

