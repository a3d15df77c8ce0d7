"""``kernel.source`` for the NumPy backend: the lowering written out as readable pseudo-code.

The text names the tile loop, how the block plan is built and shared, and every expression as it
is evaluated (sympy's own printing of the spec's expressions, on broadcast index arrays).
"""

from __future__ import annotations

import sympy

from attncc.spec.symbols import free_names


def describe(spec, kind: str, config: dict) -> str:
    """The source text of a kernel of ``kind`` (fused | linear | nystrom) with ``config``."""
    head = [f"# attncc numpy kernel for '{spec.name}' (spec {spec.hash})",
            f"# config: {', '.join(f'{k}={v}' for k, v in sorted(config.items())) or 'none'}",
            "# compute dtype: float32 for float16/float32 inputs, float64 for float64",
            "# q: (B, Hq, Nq, D) viewed as (B, Hkv, G, Nq, D); k, v: (B, Hkv, 1, Nk, D),",
            "#   broadcast over the G query heads of a kv head (never copied)"]
    body = {"fused": _fused, "linear": _linear, "nystrom": _nystrom}[kind](spec, config)
    return "\n".join([*head, "", *body]) + "\n"


def _score(spec) -> str:
    if spec.score == "additive":
        return "sum(w[h, :] * tanh(q[rows, None, :] + k[None, cols, :]), axis=-1)"
    return f"({sympy.sstr(spec.scale)}) * q[rows] @ k[cols].T"


def _fused(spec, config) -> list[str]:
    bm, bn = config["block_m"], config["block_n"]
    mask = spec.mask
    reads = sorted(free_names(mask) & set(spec.inputs)) if mask is not None else []
    varies = sorted(free_names(mask) & {"b", "h"}) if mask is not None else []
    plan = [f"plan = build_plan(spec, sizes, block_m={bm}, block_n={bn}"
            + (", inputs)   # classified per call from block min/max of " + ", ".join(reads)
               if reads else ")   # cached per sizes")]
    plan.append("# plan slices: " + (f"one per {' and '.join(varies)} (the mask reads them)"
                                     if varies else "one, shared by every batch and head"))
    if mask is None:
        plan.append("# no mask: every block is FULL")
    state = {"softmax": "row_max = -inf; row_sum = 0; acc = 0        # online softmax",
             "sigmoid": "acc = 0                                      # Σ sigmoid(s)·v",
             "topk": f"best = top-{spec.topk} buffer of (score, key)  # running top-k"}
    update = {"softmax": ["new_max = max(row_max, rowmax(s)); p = exp(s - new_max)",
                          "row_sum = row_sum * exp(row_max - new_max) + rowsum(p)",
                          "acc = acc * exp(row_max - new_max) + p @ v[cols]; row_max = new_max"],
              "sigmoid": ["acc += sigmoid(s) @ v[cols]"],
              "topk": ["best = top-k of (best ∪ s[cols])"]}[spec.normalize]
    finish = {"softmax": "out[rows] = acc / row_sum; lse[rows] = row_max + log(row_sum)",
              "sigmoid": "out[rows] = acc",
              "topk": "out[rows] = softmax(best.scores) @ v[best.keys]; lse = logsumexp(best)"}
    lines = []
    if spec.lowrank is not None:
        lines.append(f"k, v = E @ k, F @ v      # linformer: rank {spec.lowrank.size}")
    lines += plan
    lines += [f"for m in range(ceil(Nq / {bm})):            # query blocks",
              f"    rows = [m*{bm}, (m+1)*{bm})",
              f"    {state[spec.normalize]}"]
    if spec.memory_tokens:
        mem_score = _score(spec).replace("k[cols]", "mem_k").replace("k[None, cols",
                                                                     "mem_k[None, :")
        lines += [f"    s = {mem_score}"
                  f"   # {spec.memory_tokens} memory tokens: no score_mod, no mask",
                  "    update(s, v=mem_v)"]
    mod = ([f"        s = {sympy.sstr(spec.score_mod)}   # score_mod, score = s"]
           if spec.score_mod is not None else [])
    for label, masked in (("FULL", False), ("PARTIAL", True)):
        if mask is None and masked:
            continue
        lines += [f"    for n in plan.{label.lower()}_index[m]:   # {label} blocks"
                  + ("; mask skipped" if not masked else ""),
                  f"        cols = [n*{bn}, (n+1)*{bn})",
                  f"        s = {_score(spec)}", *mod]
        if masked:
            lines.append(f"        s = where({sympy.sstr(mask)}, s, -inf)   # mask")
        lines += [f"        {u}" for u in update]
    lines += ["    # EMPTY blocks are never visited", f"    {finish[spec.normalize]}"]
    return lines


def _linear(spec, config) -> list[str]:
    c = config["chunk"]
    phi = {"elu1": "where(x > 0, x + 1, exp(x))", "relu": "max(x, 0)",
           "performer": "exp(x' @ omega.T - |x'|²/2) / sqrt(features), x' = x * head_dim**-0.25"}
    lines = [f"phi(x) = {phi[spec.feature_map]}   # feature map {spec.feature_map}",
             "fq, fk = phi(q), phi(k)"]
    if spec.mask is None:
        return [*lines, "out = fq @ (fk.T @ v) / (fq @ sum(fk))   # 0 where the denominator is 0"]
    return [*lines,
            "S = 0; z = 0                                # running Σ fkᵀv, Σ fk",
            f"for c in range(ceil(Nq / {c})):            # query chunks",
            f"    rows = [c*{c}, (c+1)*{c})",
            "    a = tril(fq[rows] @ fk[rows].T)         # diagonal block, kv_idx <= q_idx",
            "    out[rows] = (fq[rows] @ S + a @ v[rows]) / (fq[rows] @ z + rowsum(a))",
            "    S += fk[rows].T @ v[rows]; z += sum(fk[rows])"]


def _nystrom(spec, config) -> list[str]:
    m = spec.lowrank.size
    s = sympy.sstr(spec.scale)
    return [f"q~, k~ = segment means of q, k over {m} landmarks",
            f"k1 = softmax(({s}) * q @ k~.T); k2 = softmax(({s}) * q~ @ k~.T)",
            f"k3 = softmax(({s}) * q~ @ k.T)",
            "out = (k1 @ pinv(k2))  @ (k3 @ v)      # pinv in float64 (Moore–Penrose)"]
