"""The torch Kernel: bind a call, pick the lowering, run it in float32/float64, cast back.

Lowerings (``kind``): ``flash`` (FusedAttention: softmax, sigmoid, top-k, Linformer after its
projection), ``linear`` (LinearAttention) and ``nystrom``. Half types compute in float32 and
return in their own dtype; autograd works through all of them (a custom Function for flash, torch's
own for the rest).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F  # noqa: N812 - the name torch code uses

from attncc.backends.autograd import autograd_backward
from attncc.backends.base import Kernel
from attncc.bind import bind
from attncc.errors import InputError
from attncc.plan import build_plan
from attncc.spec.symbols import free_names

from .autograd import FlashAttention
from .linear import run_linear
from .nystrom import run_nystrom
from .runs import RunsForward
from .schedule import build_schedule
from .source import describe
from .space import fused_eligible, sdpa_eligible
from .tiles import Problem


class TorchKernel(Kernel):
    """``kernel(q, k, v, return_lse=False, **inputs)`` on torch tensors (CPU or CUDA)."""

    backend = "torch"

    def __init__(self, spec, kind: str, config: dict):
        self.spec = spec
        self.kind = kind
        self.config = dict(config)
        self.source = describe(spec, kind, self.config)
        self.backward = functools.partial(autograd_backward, self)
        self._schedules: dict = {}
        self._runners: dict = {}
        mask_reads = free_names(spec.mask) if spec.mask is not None else set()
        self._plan_reads_inputs = bool(mask_reads & set(spec.inputs))

    def __repr__(self) -> str:
        return f"TorchKernel({self.spec.name!r}, kind={self.kind!r}, config={self.config})"

    def __call__(self, q, k, v, *, return_lse: bool = False, **inputs):
        spec = self.spec
        for name, x in (("q", q), ("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor):
                raise InputError(f"{name}: the torch backend expects a torch.Tensor, got "
                                 f"{type(x).__name__}")
        bound = bind(spec, q, k, v, inputs)
        for name, x in (("k", k), ("v", v)):
            if x.device != q.device:
                raise InputError(f"{name}: expected device {q.device} like q, got {x.device}")
        if return_lse and (spec.normalize not in ("softmax", "topk") or self.kind == "nystrom"):
            raise InputError(f"return_lse: the log-sum-exp exists for normalize softmax and topk "
                             f"(not nystrom); this spec is {spec.normalize}"
                             f"{' / nystrom' if self.kind == 'nystrom' else ''}")
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        ins = {n: (x.to(cdt) if x.is_floating_point() else x) for n, x in bound.inputs.items()}
        sizes, scale = bound.sizes, bound.scale
        if self.kind == "linear":
            out = run_linear(spec, sizes, q.to(cdt), k.to(cdt), v.to(cdt), ins,
                             self.config["chunk"])
            return out.to(q.dtype)
        if self.kind == "nystrom":
            out = run_nystrom(q.to(cdt), k.to(cdt), v.to(cdt), spec.lowrank.size, scale)
            return out.to(q.dtype)
        if (self.config.get("use_sdpa") and sdpa_eligible(spec) and not return_lse
                and bound.group == 1):
            return F.scaled_dot_product_attention(q, k, v, is_causal=spec.mask is not None,
                                                  scale=scale)
        if self._runs_ok(q, k, v, ins):
            out, lse = self._runs(sizes, scale, q.to(cdt), k.to(cdt), v.to(cdt), ins,
                                  bound.inputs)
        else:
            out, lse = self._flash(sizes, scale, q.to(cdt), k.to(cdt), v.to(cdt), ins,
                                   bound.inputs)
        if return_lse:
            return out.to(q.dtype), lse.to(q.dtype)
        return out.to(q.dtype)

    def _flash(self, sizes: dict, scale: float, q, k, v, ins: dict, raw_inputs: dict):
        spec, cfg = self.spec, self.config
        bm, bn = cfg["block_m"], cfg["block_n"]
        if spec.lowrank is not None:
            k, v = ins["E"] @ k, ins["F"] @ v
        plan = build_plan(spec, sizes, bm, bn, inputs=raw_inputs)
        schedule = self._schedule(plan, sizes, q.device)
        _, heads, nq, _ = q.shape
        kv_heads, nk = k.shape[1], k.shape[2]
        pad_q = plan.num_q_blocks * bm - nq
        pad_k = plan.num_kv_blocks * bn - nk
        q5 = F.pad(q, (0, 0, 0, pad_q)) if pad_q else q
        q5 = q5.unflatten(1, (kv_heads, heads // kv_heads))
        k4 = F.pad(k, (0, 0, 0, pad_k)) if pad_k else k
        v4 = F.pad(v, (0, 0, 0, pad_k)) if pad_k else v
        names = tuple(n for n, x in ins.items() if x.is_floating_point() and n not in ("E", "F"))
        ints = {n: x for n, x in ins.items() if not x.is_floating_point()}
        pb = Problem(spec, sizes, ints, scale, plan, nk, schedule, q.device)
        out5, lse5 = FlashAttention.apply(pb, names, q5, k4, v4, *(ins[n] for n in names))
        out = out5.flatten(1, 2)[:, :, :nq]
        lse = lse5.flatten(1, 2)[:, :, :nq, 0] if lse5.numel() else None
        return out, lse

    def _runs_ok(self, q, k, v, ins: dict) -> bool:
        """Whether the fused-runs forward (``runs.py``) serves this call: the spec allows it,
        ``use_sdpa`` asks for it, CPU tensors, no GQA (it would copy keys per query head), equal
        q/v head sizes, and no gradient wanted."""
        if not (self.config.get("use_sdpa") and fused_eligible(self.spec)):
            return False
        if q.device.type != "cpu" or v.shape[-1] != q.shape[-1] or k.shape[1] != q.shape[1]:
            return False
        tensors = (q, k, v, *(x for x in ins.values() if x.is_floating_point()))
        return not (torch.is_grad_enabled() and any(x.requires_grad for x in tensors))

    def _runs(self, sizes: dict, scale: float, q, k, v, ins: dict, raw_inputs: dict):
        cfg = self.config
        if self.spec.lowrank is not None:
            k, v = ins["E"] @ k, ins["F"] @ v
        key = self._runner_key(sizes, raw_inputs)
        runner = self._runners.get(key) if key is not None else None
        if runner is None:
            plan = build_plan(self.spec, sizes, cfg["block_m"], cfg["block_n"],
                              inputs=raw_inputs)
            runner = RunsForward(self.spec, plan, sizes, ins, q.device)
            if key is not None:
                if len(self._runners) >= 8:
                    self._runners.pop(next(iter(self._runners)))
                self._runners[key] = runner
        return runner(q, k, v, scale)

    def _runner_key(self, sizes: dict, raw_inputs: dict):
        """Cache key of a runner (plan, groups, mask tiles): the sizes, plus the bytes of the
        inputs the mask reads (up to 4 MiB; None = do not cache), so equal document ids reuse
        their masks and a changed one never does."""
        key = tuple(sorted(sizes.items()))
        if not self._plan_reads_inputs:
            return key
        names = sorted(free_names(self.spec.mask) & set(self.spec.inputs))
        arrays = [raw_inputs[n] for n in names]
        if sum(x.numel() * x.element_size() for x in arrays) > 1 << 22:
            return None
        return key + tuple((n, x.dtype, tuple(x.shape), x.detach().cpu().numpy().tobytes())
                           for n, x in zip(names, arrays, strict=True))

    def _schedule(self, plan, sizes: dict, device):
        key = (id(plan), sizes["batch"], sizes["kv_heads"], sizes["heads"], str(device))
        if key in self._schedules:
            return self._schedules[key][1]
        cfg = self.config
        schedule = build_schedule(
            plan, sizes["batch"], sizes["kv_heads"], sizes["heads"] // sizes["kv_heads"],
            kv_chunk=cfg["kv_chunk"], group_blocks=cfg["group_blocks"],
            tile_elems=cfg["tile_elems"],
            value_cost=sizes["head_dim"] if self.spec.score == "additive" else 1,
            memory=bool(self.spec.memory_tokens), device=device)
        if not self._plan_reads_inputs:
            if len(self._schedules) > 16:
                self._schedules.clear()
            self._schedules[key] = (plan, schedule)  # holds the plan so its id stays unique
        return schedule

