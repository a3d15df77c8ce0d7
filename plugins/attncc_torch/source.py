"""``kernel.source`` for the torch backend: what runs, written from the node the kernel runs.

Every line is derived from the fused attention node (its fields, and ``node.lowering``: which
paths serve it and why) and the config, the same values ``TorchKernel`` dispatches on.
"""

from __future__ import annotations

from attncc.lowering.features import linear_text
from attncc.lowering.lowrank import nystrom_text


def describe(spec, node, kind: str, config: dict) -> str:
    """Text naming the path taken (and why), the tile parameters, and every expression the
    kernel evaluates; ``spec`` only names the kernel."""
    head = [f"# attncc torch backend: spec '{spec.name}' ({spec.hash})", f"# config: {config}"]
    if kind == "linear":
        return "\n".join([*head, *_linear(node, config)])
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
        elif path == "sdpa":
            causal = ", is_causal=True" if node.mask is not None else ""
            lines += [f"# path sdpa ({why}), unless return_lse=True or kv_heads < heads:",
                      f"out = torch.nn.functional.scaled_dot_product_attention(q, k, v, "
                      f"scale=scale{causal})"]
        else:
            lines += [f"# path runs ({why}), on CPU without gradients and kv_heads == heads:",
                      "#   per segment of query blocks with equal runs of non-EMPTY key blocks "
                      "(runs.py):",
                      "#   out[rows], lse[rows] = aten._scaled_dot_product_flash_attention_for_cpu("
                      "q[rows], k[run], v[run], attn_mask=0/-inf tile (runs with a PARTIAL "
                      "block only, cached with the plan), scale=scale)"]
    lines.append(f"# path tiles ({lowering.why('tiles')}), otherwise:")
    return "\n".join(lines + _tiles(node, config))


def _tiles(node, config: dict) -> list[str]:
    score = ("(q * scale) @ k.T" if node.score == "dot"
             else "sum_d w[h, d] * tanh(q[:, None, d] + k[None, :, d])")
    lines = [
        f"# block plan (attncc.plan) in {config['block_m']}x{config['block_n']} blocks; EMPTY "
        "blocks never visited",
        "# GQA: q rows of the query heads of one kv head stacked (group*block_m rows); k, v "
        "gathered once per kv head (no copy per query head)",
        "# layout: q6 = (nQ, B, Hkv, group, block_m, D), kb/vb = (nK, B, Hkv, block_n, D) "
        "block-major copies (O(N), once per call)",
    ]
    lines += [
        "for step in schedule:                     # query blocks with equal FULL/PARTIAL counts",
        "    q_t = q6.index_select(0, step.qblocks)   # -> (nb, Hkv, G, group*block_m, D)",
    ]
    if node.memory_tokens:
        lines.append(f"    tiles = [({score} on mem_k, mem_v)]   # {node.memory_tokens} memory "
                     "tokens, no score_mod or mask")
    lines += [
        f"    for chunk in step.chunks:             # <= {config['kv_chunk']} key blocks each",
        "        k_t, v_t = kb.index_select(0, chunk.kv), vb...   # -> (nb, Hkv, G, c*block_n, D)",
        f"        s = {score}",
    ]
    if node.score_mod is not None:
        lines.append(f"        s = {node.score_mod}   # attncc.spec.numeric.evaluate on torch")
    mask = f"({node.mask.expr}) and " if node.mask is not None else ""
    lines.append(f"        s[PARTIAL cols] = where({mask}kv_idx < seq_k, s, -inf)   "
                 "# FULL cols skip the mask")
    lines.append({
        "softmax": "        state.update(s, v_t)   # attncc.lowering.states.SoftmaxState",
        "topk": f"        pass 1: thr = TopkThreshold({node.topk}) over the tiles;  pass 2: "
                "SoftmaxState over s >= thr",
        "sigmoid": "        state.update(s, v_t)   # SigmoidState: acc += sigmoid(s) @ v_t",
    }[node.normalize])
    lines.append("    out, lse, m, 1/l = state.finish()   # written back with index_copy_")
    return [
        *lines,
        "# backward: torch.autograd.Function saving q, k, v, out and per-row m, 1/l (top-k "
        "threshold); recomputes each tile: P = exp(s - m) / l,",
        "#   dS = P*(dP - D), D = rowsum(P*dP) recomputed exactly (rows of dS sum to 0),",
        "#   then torch.autograd.grad on the tile's scores for dq, dk and the floating inputs "
        "score_mod reads; dk, dv by index_add_",
    ]


def _linear(node, config: dict) -> list[str]:
    return [f"# path scan ({node.lowering.why('scan')})",
            *linear_text(node.feature_map, node.causal, config["chunk"]),
            "# autograd: torch's own (plain ops)"]
