"""The torch Kernel: check a call, pick the lowering path, run it in float32/float64, cast back.

Paths, read from the fused node (``node.lowering``, the ``strategy`` pass) and the config:
``sdpa`` (the whole call is one ``scaled_dot_product_attention``), ``runs`` (CPU: fused calls over
runs of key blocks, ``runs.py``, and their fused backward, ``runs_grad.py``), ``flex``
(``flex.py``), ``decode`` (a few query rows in one pass, ``decode.py``), and the flash
pattern over the block plan (``flash.py``; softmax, sigmoid, top-k, Linformer after its
projection); LinearAttention and Nystrom run the shared recipes (``attncc.lowering``).

Half types (``_precision``): the sdpa path takes q, k, v as given; on CUDA
(``mixed.MIXED_DEVICES``) float16 and bfloat16 stay in their dtype on the decode and tile-loop
paths, as half products with float32 results (``mixed.py``), and so do decoding steps on the CPU
(an upcast would copy the whole KV cache per step, ``bench/results/half_cpu.md``); bfloat16 on
the CPU runs path computes in bfloat16 inside the fused kernels where the CPU has bfloat16
matmuls (``runs.NATIVE_BF16``; float32 accumulation inside them; mask and bias tiles, the
log-sum-exp merge and the dq/dk/dv sums in float32); every other path, float16 on the CPU runs
path included, computes in float32. Outputs return in the input dtype; autograd works through
every path (custom Functions for flash and runs, torch's own for the rest). Under
``torch.compile``, ``traceable`` gives the sdpa path as plain torch ops (``traced.py``).

``describe`` writes ``kernel.source`` from the fused node (its fields, and ``node.lowering``:
which paths serve it and why) and the config, the same values ``TorchKernel`` dispatches on.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref

import sympy
import torch
import torch.nn.functional as F  # noqa: N812 - the name torch code uses

from attncc.backends.autograd import autograd_backward
from attncc.backends.base import Kernel
from attncc.bind import fixed_sizes
from attncc.lowering.env import SCORE_TEXT, merge_heads, split_heads
from attncc.lowering.features import linear_attention, linear_text
from attncc.lowering.lowrank import linformer, nystrom, nystrom_text
from attncc.lowering.prologue import prologue
from attncc.lowering.states import STATE_TEXT, TOPK_TEXT
from attncc.passes.strategy import causal_alignment
from attncc.plan import PlanCache

from . import mixed, traced
from .decode import MAX_ROWS, DecodeRunner, decode_fused
from .flash import FlashAttention
from .flex import MIN_ROWS, FlexRunner, printable
from .runs import NATIVE_BF16, RunsForward
from .tiles import Problem, build_schedule


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
        self._sdpa = self._runs = False
        if kind != "flash":
            return
        # the Linformer matrices that project k and v (the schema names them E and F)
        self._projection = ("E", "F") if node.projection is not None else ()
        fused = self.config["use_sdpa"]
        self._sdpa = fused and node.lowering.allows("sdpa")
        self._masked = node.mask is not None
        self._bottom_right = (self._masked
                              and causal_alignment(node.mask.expr) == "bottom_right")
        self._tails: dict = {}
        self._runs = fused and node.lowering.allows("runs")
        # a non-additive score_mod: FlexAttention's compiled forward (flex.py) where it prints
        self._flex = (FlexRunner(node, self.spec) if fused and node.lowering.allows("flex")
                      and printable(node) is None else None)
        self._drop = sympy.Not(node.mask.expr) if node.mask is not None else None
        # a few query rows (decoding) that no fused call serves: one pass (decode.py)
        self._decode = (DecodeRunner(node)
                        if fused and node.lowering.allows("decode") else None)
        self._plans = PlanCache(node, self.config["block_m"], self.config["block_n"])
        self._derived: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"TorchKernel({self.spec.name!r}, kind={self.kind!r}, config={self.config})"

    def __call__(self, q, k, v, *, return_lse: bool = False, stats=(), **inputs):
        if stats:  # per-row statistics: Kernel.call_with_stats (attncc.lowering.maps)
            return self.call_with_stats(q, k, v, stats, return_lse, inputs)
        whole = self.sdpa_serves(q, k, return_lse)  # SDPA takes q, k, v as given: no cast
        mode = self._precision(q, whole)
        args = (self.spec, self.node, q, k, v, inputs)
        kw = {"backend": "torch", "library": "torch", "return_lse": return_lse}
        call = prologue(*args, **kw, cast=mode is None)
        if mode in ("native", "mixed", "step"):  # the floating inputs (bias terms) in float32
            call = dataclasses.replace(call, inputs={
                n: x.float() if x.is_floating_point() else x for n, x in call.inputs.items()})
        if mode == "native" and not self._runs_ok(call):  # another path: all in float32
            call, mode = prologue(*args, **kw), None
        node = self.node
        if self.kind == "linear":
            out = linear_attention(node, call.q, call.k, call.v, call.inputs.get("omega"),
                                   chunk=self.config["chunk"])
            return out.to(call.dtype)
        if self.kind == "nystrom":
            out = nystrom(call.q, call.k, call.v, node.landmarks, call.scale, exact_pinv=False)
            return out.to(call.dtype)
        if whole:
            return self._whole(q, k, v, call.scale, self._tail)
        k, v = call.k, call.v
        if self._projection:
            k, v = linformer(k, v, *(call.inputs[n] for n in self._projection))
        # flex (no runs path where it serves): no lse, no gradient (no CPU backward there)
        if (not return_lse and self._flex is not None and self._flex.serves(call)
                and not _wants_grad(call)):
            out = self._flex(call)
            if out is not None:
                return out.to(call.dtype)
        # a few query rows take the decode path unless they train through the runs path: a
        # decoding step's new KV length would build a new block plan per call
        few = self._decode is not None and call.sizes["seq_q"] <= MAX_ROWS
        runs = ((not few or _wants_grad(call)) and mode in (None, "native")
                and self._runs_ok(call))
        result = self._decode(call, k, v, return_lse) if few and not runs else None
        if result is None:
            plan = self._plans.get(call.sizes, call.raw_inputs)
            key = (runs, *sorted(call.sizes.items()), str(q.device))  # a plan serves many sizes
            if runs:
                runner = self._derive(plan, key, lambda: RunsForward(
                    node, plan, call.sizes, call.inputs, q.device))
                result = runner(call.q, k, v, call.scale, call.inputs)
        if result is None:
            if mode == "native":  # the runs path declined: tiles in float32
                call = prologue(*args, **kw)
                k, v = call.k, call.v
            result = self._flash(plan, (False, *key[1:]), call, k, v,
                                 mixed.Mixed.of(q) if mode == "mixed" else None)
        out = result[0].to(call.dtype)
        return (out, result[1].to(call.dtype)) if return_lse else out

    def _precision(self, q, whole: bool):
        """How q, k, v enter the lowering (the half-type policy of the module docstring):
        "given" (the sdpa path); for float16/bfloat16 q, "mixed" (CUDA: the tile loop and
        the decode path, ``mixed.py``), "step" (a decoding step's few rows on another device:
        the decode path reads the KV cache as given, where an upcast would copy all of it),
        "native" (bfloat16 on the CPU runs path where the CPU has bfloat16 matmuls); None
        (cast to the compute dtype)."""
        if whole:
            return "given"
        half = isinstance(q, torch.Tensor) and q.dtype in mixed.HALF
        if not half or self.kind != "flash" or self._projection:
            return None
        if q.device.type in mixed.MIXED_DEVICES:
            return "mixed"
        if self._decode is not None and q.dim() == 4 and q.shape[-2] <= MAX_ROWS:
            return "step"
        if (self._runs and q.dtype == torch.bfloat16 and NATIVE_BF16
                and q.device.type == "cpu"):
            return "native"
        return None

    def sdpa_serves(self, q, k, return_lse: bool = False) -> bool:
        """Whether a call takes the sdpa path (one ``scaled_dot_product_attention``, ``_whole``):
        the node's lowering allows it, ``use_sdpa``, no ``return_lse``, and under a bottom-right
        causal mask ``seq_q <= seq_k`` (a longer query has rows that see no key; False there
        where q or k is not 4-D, the prologue says why)."""
        if not self._sdpa or return_lse:
            return False
        if not self._bottom_right:
            return True
        shapes = getattr(q, "shape", ()), getattr(k, "shape", ())
        return len(shapes[0]) == 4 == len(shapes[1]) and shapes[0][2] <= shapes[1][2]

    def traceable(self):
        """The sdpa path as plain torch ops (``Kernel.traceable``; ``traced.py``): None where
        the kernel never takes it or the spec has runtime inputs (their checks are the
        prologue's); the function declines a call ``sdpa_serves`` refuses or whose sizes
        ``traced.sizes`` cannot vouch for."""
        if not self._sdpa or self.spec.inputs:
            return None
        scale = traced.scale_function(self.spec.scale)
        if scale is None:
            return None
        fixes = fixed_sizes(self.spec)

        def fn(q, k, v, **inputs):
            found = None if inputs else traced.sizes(q, k, v, fixes)
            if found is None or not self.sdpa_serves(q, k):
                return None
            return self._whole(q, k, v, scale(found), traced.tail)

        return fn

    def _whole(self, q, k, v, scale, tail):
        """The sdpa path on q, k, v as given: top-left causal or dense, or under a bottom-right
        mask ``tail(seq_q, seq_k, dtype, device)`` where ``seq_q != seq_k``."""
        causal, mask = self._masked, None
        if self._bottom_right and q.shape[2] != k.shape[2]:
            causal, mask = False, tail(q.shape[2], k.shape[2], q.dtype, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              scale=scale, enable_gqa=q.shape[1] != k.shape[1])

    def _tail(self, nq: int, nk: int, dtype, device):
        """The bottom-right causal mask ``(1, 1, nq, nk)`` as a zero-copy view of a cached float
        buffer (0 where ``traced.tail`` keeps a pair, -inf elsewhere); None for one query row (it
        sees every key). The buffer grows by doubling, so decoding steps (``nk`` growing by one)
        reuse it."""
        if nq == 1:
            return None
        key = (nq, dtype, str(device))
        buf = self._tails.get(key)
        if buf is None or buf.shape[1] < nk:
            width = max(2 * (nk - nq), 1024)
            with torch.inference_mode(False):  # cached: later calls may save it for backward
                keep = traced.tail(nq, width + nq, dtype, device)[0, 0]
                buf = torch.zeros(keep.shape, dtype=dtype, device=device)
                self._tails[key] = buf.masked_fill_(~keep, float("-inf"))
        return buf[None, None, :, buf.shape[1] - nk:]

    def _flash(self, plan, key: tuple, call, k, v, half):
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
                     q.device, q.dtype, half)
        out5, lse5 = FlashAttention.apply(pb, names, split_heads(q, k.shape[1]), k, v,
                                          *(ins[n] for n in names))
        return merge_heads(out5), (merge_heads(lse5)[..., 0] if lse5.numel() else None)

    def _runs_ok(self, call) -> bool:
        """Whether the fused-runs path (``runs.py``) serves this call: the node's lowering
        allows it, ``use_sdpa`` asks for it, CPU tensors, equal q/v head sizes, and no floating
        input that needs a gradient (a learnable bias: the tile loop's exact gradient)."""
        q, v = call.q, call.v
        if not self._runs or q.device.type != "cpu" or v.shape[-1] != q.shape[-1]:
            return False
        return not (torch.is_grad_enabled() and any(
            x.requires_grad for x in call.inputs.values() if x.is_floating_point()))

    def _derive(self, plan, key, build):
        """``build()``, cached with ``plan`` (dropped when the plan is): schedules, runners."""
        derived = self._derived.setdefault(plan, {})
        if key not in derived:
            derived[key] = build()
        return derived[key]


def _wants_grad(call) -> bool:
    """Whether autograd records this call (a tensor of it requires a gradient)."""
    tensors = (call.q, call.k, call.v, *call.inputs.values())
    return torch.is_grad_enabled() and any(x.requires_grad for x in tensors)


def describe(spec, node, kind: str, config: dict) -> str:
    """Text naming the path taken (and why), the tile parameters, and every expression the
    kernel evaluates; ``spec`` only names the kernel."""
    head = [f"# attncc torch backend: spec '{spec.name}' ({spec.hash})", f"# config: {config}"]
    if kind == "linear":
        return "\n".join([*head, f"# path scan ({node.lowering.why('scan')})",
                          *linear_text(node.feature_map, node.causal, config["chunk"]),
                          "# autograd: torch's own (plain ops)"])
    if kind == "nystrom":
        return "\n".join([*head, f"# path nystrom ({node.lowering.why('nystrom')})",
                          *nystrom_text(node.landmarks, str(node.scale), exact_pinv=False),
                          "# autograd: torch's own (plain ops)"])
    lowering, lines = node.lowering, list(head)
    if node.projection is not None:
        lines.append(f"k, v = E @ k, F @ v   # sdpa not served; linformer projection to "
                     f"{node.projection} keys before the runs and tiles paths")
    for path in ("sdpa", "runs"):
        why = lowering.why(path)
        if not config["use_sdpa"]:
            lines.append(f"# path {path}: not taken (use_sdpa=False; lowering: {why})")
        elif not lowering.allows(path):
            lines.append(f"# path {path}: not served ({why})")
        elif path == "sdpa" and "bottom-right" in why:
            lines += [f"# path sdpa ({why}), unless return_lse=True or seq_q > seq_k:",
                      "out = torch.nn.functional.scaled_dot_product_attention(q, k, v, "
                      "attn_mask=tail(seq_q, seq_k) (None for one query; is_causal when "
                      "seq_q == seq_k), scale=scale, enable_gqa=kv_heads < heads)"]
        elif path == "sdpa":
            causal = ", is_causal=True" if node.mask is not None else ""
            lines += [f"# path sdpa ({why}), unless return_lse=True:",
                      f"out = torch.nn.functional.scaled_dot_product_attention(q, k, v, "
                      f"scale=scale{causal}, enable_gqa=kv_heads < heads)"]
        else:
            lines += [f"# path runs ({why}), on CPU (GQA: kv-head slices; a floating input "
                      "that needs a gradient takes the tiles path):",
                      "#   per segment of query blocks with equal runs of non-EMPTY key blocks, or "
                      "runs growing by one block per block (a causal triangle) (runs.py):",
                      "#   out[rows], lse[rows] = aten._scaled_dot_product_flash_attention_for_cpu("
                      "q[rows], k[run], v[run], attn_mask=0/-inf tile (runs with a PARTIAL "
                      "block only, cached with the plan), scale=scale)",
                      "#   backward (runs_grad.py): per call, aten._scaled_dot_product_flash_"
                      "attention_for_cpu_backward(dout[rows], q[rows], k[run], v[run], out[rows], "
                      "lse[rows] (merged, +inf where no key), attn_mask=tile); dk, dv index_add_",
                      "#   a triangle: one call over the segment's rows as one tall block, "
                      "is_causal=True, no mask tile (its diagonal checked to be exactly causal; "
                      "a key-form bias adds its tile)"]
    if lowering.allows("flex") and config["use_sdpa"]:
        why = printable(node)
        lines += [f"# path flex: not served ({why})"] if why else [
            f"# path flex ({lowering.why('flex')}), on CPU without gradients or lse, "
            f"seq_q >= {MIN_ROWS}:",
            "out = torch.compile(flex_attention)(q, k, v, score_mod, block_mask="
            "BlockMask.from_kv_blocks(attncc plan in 128x128 blocks), scale=scale)   "
            "# the printed module: kernel._flex.source"]
    if lowering.allows("decode") and config["use_sdpa"]:
        lines += [f"# path decode ({lowering.why('decode')}), for seq_q <= {MAX_ROWS} where the "
                  "runs path does not serve:",
                  *(["out = torch.nn.functional.scaled_dot_product_attention(q, k, v, "
                     "attn_mask=mask (bool) or bias masked -inf, scale=scale, enable_gqa=...)"
                     "   # return_lse: the dense form below"]
                    if decode_fused(node) else []),
                  "s = score_mod((scale * q) @ k.T) masked -inf; out = softmax(s) @ v   # "
                  "whole (B, Hkv, group, seq_q, seq_k) tile, decode.py"]
    lines.append(f"# path tiles ({lowering.why('tiles')}), otherwise:")
    return "\n".join(lines + _tiles(node, config))


def _tiles(node, config: dict) -> list[str]:
    score = SCORE_TEXT[node.score].format(scale="scale", q="q_t", k="{k}")
    init, update, _ = STATE_TEXT[node.normalize]
    topk = [t.format(topk=node.topk) for t in TOPK_TEXT] if node.normalize == "topk" else None
    lines = [
        f"# block plan (attncc.plan) in {config['block_m']}x{config['block_n']} blocks; EMPTY "
        "blocks never visited",
        "# GQA: q rows of the query heads of one kv head stacked (group*block_m rows); k, v "
        "gathered once per kv head (no copy per query head)",
        "# layout: q6 = (nQ, B, Hkv, group, block_m, D), kb/vb = (nK, B, Hkv, block_n, D) "
        "block-major copies (O(N), once per call)",
        "for step in schedule:                     # query blocks with equal FULL/PARTIAL counts",
        "    q_t = q6.index_select(0, step.qblocks)   # -> (nb, Hkv, G, group*block_m, D)",
        *([f"    {topk[0]}"] if topk else []), f"    {init}",
    ]
    if node.memory_tokens:
        lines += [f"    s = {score.format(k='mem_k')}   # {node.memory_tokens} memory tokens, "
                  "no score_mod or mask", *([f"    {topk[1]}"] if topk else []),
                  f"    {update.format(v='mem_v')}"]
    lines += [
        f"    for chunk in step.chunks:             # <= {config['kv_chunk']} key blocks each",
        "        k_t, v_t = kb.index_select(0, chunk.kv), vb...   # -> (nb, Hkv, G, c*block_n, D)",
        f"        s = {score.format(k='k_t')}",
    ]
    if node.score_mod is not None:
        lines.append(f"        s = {node.score_mod}   # attncc.spec.numeric.evaluate on torch")
    mask = f"({node.mask.expr}) and " if node.mask is not None else ""
    lines.append(f"        s[PARTIAL cols] = where({mask}kv_idx < seq_k, s, -inf)   "
                 "# FULL cols skip the mask")
    return [
        *lines, *([f"        {topk[1]}"] if topk else []), f"        {update.format(v='v_t')}",
        "    out, lse, m, 1/l = state.finish()   # written back with index_copy_",
        "# backward: torch.autograd.Function saving q, k, v, out and per-row m, 1/l (top-k "
        "threshold); recomputes each tile: P = exp(s - m) / l,",
        "#   dS = P*(dP - D), D = rowsum(P*dP) recomputed exactly (rows of dS sum to 0),",
        "#   then torch.autograd.grad on the tile's scores for dq, dk and the floating inputs "
        "score_mod reads; dk, dv by index_add_",
    ]
