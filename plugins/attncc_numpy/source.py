"""``kernel.source`` for the NumPy backend: the lowering of the attention node as pseudo-code.

Every line is chosen by the same node field the kernel's code branches on, and its text comes
from the table that also holds the code (``tiles.SCORES``, ``tiles.NORMALIZE``, ``tiles.TOPK``,
``linear.FEATURE_TEXT``); expressions are sympy's own printing of the node's, as evaluated on
broadcast index arrays.
"""

from __future__ import annotations

import sympy

from attncc.lowering.prologue import COMPUTE
from attncc_numpy.kernel import DTYPES
from attncc_numpy.linear import CAUSAL_TEXT, DENSE_TEXT, FEATURE_TEXT
from attncc_numpy.tiles import NORMALIZE, SCORES, TOPK


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
    body = {"tiles": _fused, "scan": _linear, "nystrom": _nystrom}[path](node, config)
    return "\n".join([*head, "", *body]) + "\n"


def _plan(node, bm: int, bn: int) -> list[str]:
    mask = node.mask
    reads = ", ".join(mask.reads_inputs) if mask is not None else ""
    lines = [f"plan = PlanCache(node, block_m={bm}, block_n={bn}).get(sizes"
             + (f", inputs)   # per sizes and contents of {reads} (block min/max)" if reads
                else ")   # per sizes")]
    varies = " and ".join(mask.varies_with) if mask is not None else ""
    lines.append("# plan slices: " + (f"one per {varies} (the mask reads them)" if varies
                                      else "one, shared by every batch and head"))
    if mask is None:
        lines.append("# no mask: every block is FULL")
    return lines


def _fused(node, config) -> list[str]:
    bm, bn = config["block_m"], config["block_n"]
    init, update, finish = NORMALIZE[node.normalize]
    score = SCORES[node.score]
    scale = sympy.sstr(node.scale)
    lines = []
    if node.projection is not None:
        lines.append(f"k, v = E @ k, F @ v      # linformer: rank {node.projection}")
    lines += _plan(node, bm, bn)
    lines += [f"for m in range(ceil(Nq / {bm})):            # query blocks",
              f"    rows = [m*{bm}, (m+1)*{bm})"]
    topk = [t.format(topk=node.topk) for t in TOPK] if node.normalize == "topk" else None
    if topk:
        lines.append(f"    {topk[0]}")
    lines.append(f"    {init}")
    if node.memory_tokens:
        lines += [f"    s = {score.format(scale=scale, k='mem_k')}"
                  f"   # {node.memory_tokens} memory tokens: no score_mod, no mask"]
        lines += [f"    {topk[1]}"] if topk else []
        lines.append(f"    {update.replace('v[cols]', 'mem_v')}")
    mod = ([f"        s = {sympy.sstr(node.score_mod)}   # score_mod, score = s"]
           if node.score_mod is not None else [])
    for label, masked in (("FULL", False), ("PARTIAL", True)):
        if node.mask is None and masked:
            continue
        lines += [f"    for n in plan.{label.lower()}_index[m]:   # {label} blocks"
                  + ("; mask skipped" if not masked else ""),
                  f"        cols = [n*{bn}, (n+1)*{bn})",
                  f"        s = {score.format(scale=scale, k='k[cols]')}", *mod]
        if masked:
            lines.append(f"        s = where({sympy.sstr(node.mask.expr)}, s, -inf)   # mask")
        lines += [f"        {topk[1]}"] if topk else []
        lines.append(f"        {update}")
    lines += ["    # EMPTY blocks are never visited", f"    {finish}"]
    return lines


def _linear(node, config) -> list[str]:
    lines = [f"phi(x) = {FEATURE_TEXT[node.feature_map]}   # feature map {node.feature_map}",
             "fq, fk = phi(q), phi(k)"]
    body = CAUSAL_TEXT if node.causal else DENSE_TEXT
    return [*lines, *(t.format(chunk=config.get("chunk")) for t in body)]


def _nystrom(node, config) -> list[str]:
    s = sympy.sstr(node.scale)
    return [f"q~, k~ = segment means of q, k over {node.landmarks} landmarks",
            f"k1 = softmax(({s}) * q @ k~.T); k2 = softmax(({s}) * q~ @ k~.T)",
            f"k3 = softmax(({s}) * q~ @ k.T)",
            "out = (k1 @ pinv(k2)) @ (k3 @ v)      # pinv in float64 (Moore–Penrose)"]
