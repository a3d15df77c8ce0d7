"""The NumPy kernel: the shared call prologue, the block plan, then the node's lowering.

Float16 and float32 inputs are computed in float32, float64 in float64
(``attncc.lowering.prologue``); the output comes back in the input dtype, the lse in the compute
dtype. Inputs must be NumPy arrays.

``describe`` writes ``kernel.source``, the lowering as pseudo-code: every line is chosen by the
same node field the kernel's code branches on, and its text comes from the tables beside the
code (the shared recipes' ``SCORE_TEXT``, ``STATE_TEXT``, ``TOPK_TEXT`` and ``nystrom_text``;
``linear.describe``); expressions are sympy's own printing of the node's, as
evaluated on broadcast index arrays.
"""

from __future__ import annotations

import sympy

from attncc.backends.base import Kernel
from attncc.lowering.env import SCORE_TEXT
from attncc.lowering.lowrank import linformer, nystrom, nystrom_text
from attncc.lowering.prologue import COMPUTE, prologue
from attncc.lowering.states import STATE_TEXT, TOPK_TEXT
from attncc.plan import PlanCache
from attncc_numpy.linear import describe as linear_text
from attncc_numpy.linear import run_linear
from attncc_numpy.tiles import Stats, TileScorer, run_fused

DTYPES = ("float16", "float32", "float64")


class NumpyKernel(Kernel):
    """``kernel(q, k, v, return_lse=False, stats=(), **inputs)`` on NumPy arrays; see the module
    docstring. ``stats``: per-row statistics from the lse of this call and one more pass over the
    visited blocks (``attncc.lowering.maps``).

    ``node`` is the graph's attention node, ``path`` its lowering (tiles | scan | nystrom).
    ``last_plan`` and ``last_stats`` (FULL and PARTIAL tiles visited) describe the latest call.
    """

    backend = "numpy"
    backward = None

    def __init__(self, spec, node, path: str, config: dict):
        # self.node (Kernel.node) is what attention_map and stats= read
        self.spec, self.node, self.path, self.config = spec, node, path, dict(config)
        self.source = describe(spec, node, path, self.config)
        self.last_plan, self.last_stats = None, Stats()
        self._plans = (PlanCache(node, config["block_m"], config["block_n"])
                       if path == "tiles" else None)

    def __repr__(self) -> str:
        return f"NumpyKernel({self.spec.name!r}, {self.path}, config={self.config})"

    def __call__(self, q, k, v, *, return_lse: bool = False, stats=(), **inputs):
        if stats:
            return self.call_with_stats(q, k, v, stats, return_lse, inputs)
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
            scorer = TileScorer(node, call.sizes, call.inputs, call.scale, call.q.dtype,
                                plan.block_n)
            out, lse = run_fused(node, plan, scorer, call.q, k_c, v_c, stats)
            self.last_plan, self.last_stats = plan, stats
        out = out.astype(call.dtype, copy=False)
        return (out, lse) if return_lse else out


def describe(spec, node, path: str, config: dict) -> str:
    """The source text of ``node`` lowered by ``path`` (tiles | scan | nystrom) with
    ``config``; ``spec`` names the kernel."""
    compute = ", ".join(f"{d} -> {COMPUTE[d]}" for d in DTYPES)
    head = [f"# attncc numpy kernel for '{spec.name}' (spec {spec.hash})",
            f"# lowering: {path} ({node.lowering.why(path)})",
            f"# config: {', '.join(f'{k}={v}' for k, v in sorted(config.items())) or 'none'}",
            f"# compute dtype: {compute}",
            "# q: (B, Hq, Nq, D) viewed as (B, Hkv, G, Nq, D); k, v: (B, Hkv, 1, Nk, D),",
            "#   broadcast over the G query heads of a kv head (never copied)"]
    if path == "tiles":
        body = _fused(node, config)
    elif path == "scan":
        body = linear_text(node, config["chunk"])
    else:
        body = nystrom_text(node.landmarks, sympy.sstr(node.scale), exact_pinv=True)
    return "\n".join([*head, "", *body]) + "\n"


def _fused(node, config) -> list[str]:
    bm, bn, mask = config["block_m"], config["block_n"], node.mask
    init, update, finish = STATE_TEXT[node.normalize]
    score, scale = SCORE_TEXT[node.score], sympy.sstr(node.scale)
    lines = []
    if node.projection is not None:
        lines.append(f"k, v = E @ k, F @ v      # linformer: rank {node.projection}")
    reads = ", ".join(mask.reads_inputs) if mask is not None else ""
    lines.append(f"plan = PlanCache(node, block_m={bm}, block_n={bn}).get(sizes"
                 + (f", inputs)   # per sizes and contents of {reads} (block min/max)" if reads
                    else ")   # per sizes"))
    varies = " and ".join(mask.varies_with) if mask is not None else ""
    lines.append("# plan slices: " + (f"one per {varies} (the mask reads them)" if varies
                                      else "one, shared by every batch and head"))
    if mask is None:
        lines.append("# no mask: every block is FULL")
    lines += [f"for m in range(ceil(Nq / {bm})):            # query blocks",
              f"    rows = [m*{bm}, (m+1)*{bm})"]
    topk = [t.format(topk=node.topk) for t in TOPK_TEXT] if node.normalize == "topk" else None
    if topk:
        lines.append(f"    {topk[0]}")
    lines.append(f"    {init}")
    if node.memory_tokens:
        lines += [f"    s = {score.format(scale=scale, q='q[rows]', k='mem_k')}"
                  f"   # {node.memory_tokens} memory tokens: no score_mod, no mask"]
        lines += [f"    {topk[1]}"] if topk else []
        lines.append(f"    {update.format(v='mem_v')}")
    mod = ([f"        s = {sympy.sstr(node.score_mod)}   # score_mod, score = s"]
           if node.score_mod is not None else [])
    for label, masked in (("FULL", False), ("PARTIAL", True)):
        if node.mask is None and masked:
            continue
        lines += [f"    for n in plan.{label.lower()}_index[m]:   # {label} blocks"
                  + ("; mask skipped" if not masked else ""),
                  f"        cols = [n*{bn}, (n+1)*{bn})",
                  f"        s = {score.format(scale=scale, q='q[rows]', k='k[cols]')}", *mod]
        if masked:
            lines.append(f"        s = where({sympy.sstr(node.mask.expr)}, s, -inf)   # mask")
        lines += [f"        {topk[1]}"] if topk else []
        lines.append(f"        {update.format(v='v[cols]')}")
    lines += ["    # EMPTY blocks are never visited", f"    {finish}"]
    return lines
