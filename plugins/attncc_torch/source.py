"""``kernel.source`` for the torch backend: a readable account of exactly what runs."""

from __future__ import annotations

from .space import fused_eligible, sdpa_eligible


def describe(spec, kind: str, config: dict) -> str:
    """Text naming the lowering, the tile parameters, and every expression the kernel evaluates."""
    head = [f"# attncc torch backend: spec '{spec.name}' ({spec.hash})", f"# config: {config}"]
    if kind == "linear":
        return "\n".join([*head, _linear(spec, config)])
    if kind == "nystrom":
        return "\n".join([*head, _NYSTROM.format(m=spec.lowrank.size)])
    lines = [*head]
    if config.get("use_sdpa") and sdpa_eligible(spec):
        causal = ", is_causal=True" if spec.mask is not None else ""
        lines.append(f"out = torch.nn.functional.scaled_dot_product_attention(q, k, v, "
                     f"scale=scale{causal})   # dispatched: dense/causal dot-product softmax")
        lines.append("# return_lse=True, or kv_heads < heads (GQA), runs the paths below "
                     "instead")
    if config.get("use_sdpa") and fused_eligible(spec):
        lines += [
            "# CPU, no gradient wanted: per group of query blocks with equal runs of non-EMPTY "
            "key blocks (runs.py)",
            "#   out[rows], lse[rows] = aten._scaled_dot_product_flash_attention_for_cpu("
            "q[rows], k[runs], v[runs], attn_mask=0/-inf mask tile (PARTIAL groups only, cached "
            "for index-only masks), scale=scale)",
            "# otherwise (gradients, CUDA, value_dim != head_dim):"]
    lines += _flash(spec, config)
    return "\n".join(lines)


def _flash(spec, config: dict) -> list[str]:
    score = ("(q * scale) @ k.T" if spec.score == "dot"
             else "sum_d w[h, d] * tanh(q[:, None, d] + k[None, :, d])")
    lines = [
        "# flash pattern over attncc.plan.build_plan(spec, sizes, "
        f"block_m={config['block_m']}, block_n={config['block_n']}); EMPTY blocks never visited",
        "# GQA: q rows of the query heads of one kv head stacked (group*block_m rows); k, v "
        "gathered once per kv head (no copy per query head)",
        "# layout: q6 = (nQ, B, Hkv, group, block_m, D), kb/vb = (nK, B, Hkv, block_n, D) "
        "block-major copies (O(N), once per call)",
    ]
    if spec.lowrank is not None:
        lines.append("k, v = E @ k, F @ v                      # linformer projection first")
    lines += [
        "for step in schedule:                     # query blocks with equal FULL/PARTIAL counts",
        "    q_t = q6.index_select(0, step.qblocks)   # -> (nb, Hkv, G, group*block_m, D)",
    ]
    if spec.memory_tokens:
        lines.append(f"    tiles = [({score} on mem_k, mem_v)]   # {spec.memory_tokens} memory "
                     "tokens, no score_mod or mask")
    lines += [
        f"    for chunk in step.chunks:             # <= {config['kv_chunk']} key blocks each",
        "        k_t, v_t = kb.index_select(0, chunk.kv), vb...   # -> (nb, Hkv, G, c*block_n, D)",
        f"        s = {score}",
    ]
    if spec.score_mod is not None:
        lines.append(f"        s = {spec.score_mod}   # attncc.spec.numeric.evaluate on torch")
    mask = f"({spec.mask}) and " if spec.mask is not None else ""
    lines.append(f"        s[PARTIAL cols] = where({mask}kv_idx < seq_k, s, -inf)   "
                 "# FULL cols skip the mask")
    norm = {
        "softmax": "        online softmax: m, l, acc = update(m, l, acc, s, v_t)",
        "topk": f"        pass 1: thr = running torch.topk(s, {spec.topk}) K-th value;"
                "  pass 2: online softmax over s >= thr",
        "sigmoid": "        acc += sigmoid(s) @ v_t   # unnormalized",
    }[spec.normalize]
    lines.append(norm)
    lines.append("    out = acc / l; lse = m + log(l)   # out written with index_copy_"
                 if spec.normalize != "sigmoid" else "    out = acc")
    lines.append("# backward: torch.autograd.Function saving q, k, v, out and per-row m, 1/l"
                 " (top-k threshold); recomputes each tile: P = exp(s - m) / l,")
    lines.append("#   dS = P*(dP - rowsum(dO*O)) (rows of dS re-centred to sum 0 when a floating "
                 "score_mod input needs a gradient),")
    lines.append("#   then torch.autograd.grad on the tile's scores for dq, dk and the floating "
                 "inputs score_mod reads; dk, dv by index_add_")
    return lines


def _linear(spec, config: dict) -> str:
    phi = {"elu1": "elu(x) + 1", "relu": "relu(x)",
           "performer": "exp(omega @ x' - |x'|^2 / 2) / sqrt(features), x' = x * D**-0.25"}
    if spec.mask is None:
        body = "out = phi(q) @ (phi(k).T @ v) / phi(q) @ sum(phi(k))   # zero denominator -> 0"
    else:
        body = (f"causal, chunks of {config['chunk']}: S_c = phi(k_c).T @ v_c; prefix = "
                "cumsum(S) - S;\nout_c = (phi(q_c) @ prefix_c + tril(phi(q_c) @ phi(k_c).T) @ "
                "v_c) / (same with ones)")
    return f"phi(x) = {phi[spec.feature_map]}\n{body}\n# autograd: torch's own (plain ops)"


_NYSTROM = """landmarks: means of {m} equal segments of q and k
out = softmax(s q k~.T) @ torch.linalg.pinv(softmax(s q~ k~.T)) @ (softmax(s q~ k.T) @ v)
# autograd: torch's own (plain ops); GQA: k, v expanded to the query heads (see nystrom.py)"""
