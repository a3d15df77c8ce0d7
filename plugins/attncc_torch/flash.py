"""The flash pattern over the block plan: forward with an online softmax, recomputing backward.

Tensors arrive padded, block-major and laid out for GQA without copies: query rows
``q6 (nQ, B, Hkv, group, bm, D)``, keys and values ``(nK, B, Hkv, bn, D)`` (one block per index
of dim 0, which ``index_select`` copies fast). The forward keeps per row the running max
``m``, sum ``l`` and accumulator (softmax), or just the accumulator (sigmoid); top-k first finds the
K-th largest kept score of every row with a running ``torch.topk`` over the chunks, then runs the
softmax over the scores at or above it. Saved for backward: q, k, v, out and per-row statistics
(row max, 1/sum, top-k threshold) — never an N×N matrix. The backward recomputes each tile
(FlashAttention-2: ``dS = P ∘ (dP − D)``, with ``D = rowsum(P ∘ dP)`` recomputed exactly rather
than taken from ``rowsum(dO ∘ O)``, see ``_exact_delta``) and differentiates the tile's own scores
with ``torch.autograd.grad`` on the tile, which also yields the gradients of score_mod inputs.
``FlashAttention`` (a ``torch.autograd.Function``) ties the two together.
"""

from __future__ import annotations

import torch

from attncc.lowering.states import SigmoidState, SoftmaxState, TopkThreshold

from .tiles import Problem

NEG_INF = float("-inf")


class FlashAttention(torch.autograd.Function):
    """``apply(problem, names, q5, k4, v4, *tensors) -> (out5, lse5)``.

    Inside, q, k, v are block-major, ``(nQ, B, Hkv, group, block_m, D)`` and
    ``(nK, B, Hkv, block_n, D)`` (``Problem.to_blocks``), so that a step's gathers are
    ``index_select`` along dim 0 and its results one ``index_copy_`` / ``index_add_``.
    ``tensors`` are the floating inputs named by ``names`` (in the compute dtype), which receive
    gradients; integer inputs live in ``problem.inputs``. ``lse5`` is not differentiable (it is
    empty for sigmoid, which has none).
    """

    @staticmethod
    def forward(ctx, pb: Problem, names: tuple, q5, k4, v4, *tensors):
        inputs = {**pb.inputs, **dict(zip(names, tensors, strict=True))}
        q6, kb, vb = pb.to_blocks(q5), pb.to_kv_blocks(k4), pb.to_kv_blocks(v4)
        out6, rows = forward(pb, q6, kb, vb, inputs)
        lse = pb.from_blocks(rows["lse"]) if rows["lse"] is not None else q5.new_empty(0)
        ctx.pb, ctx.names = pb, names
        ctx.row_names = tuple(n for n, x in rows.items() if x is not None)
        ctx.save_for_backward(q6, kb, vb, out6, *(rows[n] for n in ctx.row_names), *tensors)
        ctx.mark_non_differentiable(lse)
        return pb.from_blocks(out6), lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        pb, names = ctx.pb, ctx.names
        q5, k4, v4, out, *rest = ctx.saved_tensors
        n_rows = len(ctx.row_names)
        rows = dict.fromkeys(("lse", "m", "inv_l", "thr"))
        rows.update(zip(ctx.row_names, rest[:n_rows], strict=True))
        tensors = rest[n_rows:]
        inputs = {**pb.inputs, **dict(zip(names, tensors, strict=True))}
        wanted = [name for i, name in enumerate(names) if ctx.needs_input_grad[5 + i]]
        saved = {"q6": q5, "k4": k4, "v4": v4, "out6": out, "inputs": inputs, "rows": rows}
        dq6, dk, dv, dinp = backward(pb, saved, pb.to_blocks(dout), wanted)
        return (None, None, pb.from_blocks(dq6), pb.from_kv_blocks(dk), pb.from_kv_blocks(dv),
                *(dinp.get(name) for name in names))


def forward(pb: Problem, q6, k4, v4, inputs: dict):
    """``(out6, rows)`` for block-major ``q6 (nQ, B, Hkv, group, bm, D)``, ``k4``/``v4`` block-major
    ``(nK, B, Hkv, bn, D)``: ``out6`` has the same layout; ``rows`` maps lse, m, inv_l, thr to
    ``(..., bm, 1)`` tensors (None where the normalization has no such statistic).

    The per-row states are the shared ones (``attncc.lowering.states``, in place: no autograd
    here). The backward rebuilds P as ``exp(s - m) * inv_l`` rather than ``exp(s - lse)``:
    rounding lse (large where scores are large) would scale every P of a row by one common factor.
    """
    norm = pb.node.normalize
    out = q6.new_zeros((*q6.shape[:-1], v4.shape[-1]))
    soft = norm != "sigmoid"

    def new(fill):
        return torch.full((*q6.shape[:-1], 1), fill, dtype=q6.dtype, device=q6.device)

    rows = {"lse": new(NEG_INF) if soft else None, "m": new(0.0) if soft else None,
            "inv_l": new(0.0) if soft else None, "thr": new(NEG_INF) if norm == "topk" else None}
    for step in pb.schedule.steps:
        q = pb.rows(q6, step)
        tiles = _tiles(pb, step, q, k4, v4, inputs)
        lead = q.shape[:-1]
        thr = None
        if norm == "topk":
            best = TopkThreshold(pb.node.topk, lead, q)
            for s, _ in tiles:
                best.update(s)
            thr = best.value()
        state = (SoftmaxState if soft else SigmoidState)(lead, v4.shape[-1], q, inplace=True)
        for s, v in tiles:
            keep = None if thr is None else TopkThreshold.keeps(s, thr)
            state.update(s, v, keep, owned=_owned(s))
        done = state.finish()
        pb.put_rows(out, step, done.out)
        for name, value in (("lse", done.lse), ("m", done.row_max), ("inv_l", done.inv_sum),
                            ("thr", thr)):
            if value is not None:
                pb.put_rows(rows[name], step, value)
    return out, rows


def _tiles(pb: Problem, step, q, k4, v4, inputs: dict):
    """Lazily yields ``(scores, values)`` of a step: the memory tokens first, then each chunk."""
    sl = step.slice

    def generate():
        if pb.memory:
            yield pb.memory_scores(sl, q, inputs), inputs["mem_v"][None, sl.h0:sl.h0 + sl.nh, None]
        for chunk in step.chunks:
            k, v = pb.cols(k4, sl, chunk), pb.cols(v4, sl, chunk)
            yield pb.scores(step, chunk, q, k, inputs), v

    return _Replay(generate)


class _Replay:
    """An iterable that regenerates its items on every pass (top-k reads the tiles twice)."""

    def __init__(self, generate):
        self.generate = generate

    def __iter__(self):
        return self.generate()


def _owned(s) -> bool:
    """Whether the tile may be overwritten: score tiles are fresh results (matmul, score_mod,
    gathers), never saved tensors; an expanded (broadcast) one is not contiguous."""
    return not s.requires_grad and s.is_contiguous()


def backward(pb: Problem, saved: dict, dout6, grad_inputs: list[str]):
    """Gradients ``(dq6, dk4, dv4, {input name: grad})`` for the tensors ``forward`` read.

    ``grad_inputs`` names the floating inputs that need a gradient (memory tokens included).
    """
    q6, k4, v4, out6 = saved["q6"], saved["k4"], saved["v4"], saved["out6"]
    inputs, rows = saved["inputs"], saved["rows"]
    norm = pb.node.normalize
    dq6, dk4, dv4 = torch.zeros_like(q6), torch.zeros_like(k4), torch.zeros_like(v4)
    dinp = {name: torch.zeros_like(inputs[name]) for name in grad_inputs}
    delta = (dout6 * out6).sum(-1, keepdim=True) if norm != "sigmoid" else None
    for step in pb.schedule.steps:
        sl = step.slice
        q, do = pb.rows(q6, step), pb.rows(dout6, step)
        stat = {n: (pb.rows(x, step) if x is not None else None)
                for n, x in (*rows.items(), ("delta", delta))}
        dq = torch.zeros_like(q)
        tiles = []
        if pb.memory:
            tiles.append((None, None, inputs["mem_v"][None, sl.h0:sl.h0 + sl.nh, None]))
        tiles += [(chunk, pb.cols(k4, sl, chunk), pb.cols(v4, sl, chunk))
                  for chunk in step.chunks]
        if delta is not None:
            stat["delta"] = _exact_delta(pb, step, q, do, tiles, inputs, stat)
        for chunk, k, v in tiles:
            leaves = {name: inputs[name].detach().requires_grad_() for name in grad_inputs}
            env_inputs = {**inputs, **leaves}
            with torch.enable_grad():
                q_leaf = q.detach().requires_grad_()
                k_leaf = k.detach().requires_grad_() if k is not None else None
                if chunk is None:
                    s = pb.memory_scores(sl, q_leaf, env_inputs)
                    v = env_inputs["mem_v"][None, sl.h0:sl.h0 + sl.nh, None]
                else:
                    s = pb.scores(step, chunk, q_leaf, k_leaf, env_inputs)
            ds, dv = _tile_grads(norm, s.detach(), v.detach(), do, stat)
            wrt = [q_leaf] + ([k_leaf] if k_leaf is not None else []) + list(leaves.values())
            grads = torch.autograd.grad(s, wrt, ds, allow_unused=True)
            dq += grads[0]
            named = dict(zip(leaves, grads[len(wrt) - len(leaves):], strict=True))
            if chunk is None:
                if "mem_v" in dinp:
                    named["mem_v"] = _mem_grad(inputs["mem_v"], sl, dv)
            else:
                pb.add_cols(dk4, sl, chunk, grads[1])
                pb.add_cols(dv4, sl, chunk, dv)
            for name, g in named.items():
                if g is not None:
                    dinp[name] += g
        pb.put_rows(dq6, step, dq)
    return dq6, dk4, dv4, dinp


def _exact_delta(pb: Problem, step, q, do, tiles, inputs: dict, stat: dict):
    """``D' = D + rowsum(P ∘ (dP − D))``: the delta corrected so that every row of dS sums to 0.

    Exact arithmetic gives ``rowsum(dS) = 0``; in floating point the residual of
    ``rowsum(dO ∘ O)`` is ~1 ulp of the row's terms (O's own rounding), and it reaches the
    gradients multiplied by whatever weights dS: keys (|k| ~ 1e2 where scores are ~1e3 and the
    softmax is nearly one-hot: dq was 14x the eager float32 error, hard attention's exactly-zero
    dq was not zero) and inputs read by position (an ALiBi slope multiplies dS by
    ``q_idx - kv_idx``). Removing it, as autograd through a softmax does, costs one more
    recompute of the step's tiles, so it runs for every softmax and top-k backward.
    """
    delta = stat["delta"]
    total = torch.zeros_like(delta)
    for chunk, k, v in tiles:
        if chunk is None:
            s = pb.memory_scores(step.slice, q, inputs)
        else:
            s = pb.scores(step, chunk, q, k, inputs)
        p = _probs(s, stat)
        total += (p * (do @ v.transpose(-1, -2) - delta)).sum(-1, keepdim=True)
    return delta + total


def _probs(s, stat: dict):
    p = torch.exp(s - stat["m"]) * stat["inv_l"]
    if stat["thr"] is not None:
        p = torch.where(TopkThreshold.keeps(s, stat["thr"]), p, 0.0)
    return p


def _tile_grads(norm: str, s, v, do, stat: dict):
    """``(dS, dV_tile)`` of one tile from its recomputed scores and the saved row statistics."""
    if norm == "sigmoid":
        w = torch.sigmoid(s)
        dv = w.transpose(-1, -2) @ do
        return (do @ v.transpose(-1, -2)) * w * (1 - w), dv
    p = _probs(s, stat)
    dv = p.transpose(-1, -2) @ do
    ds = p * (do @ v.transpose(-1, -2) - stat["delta"])
    return ds, dv


def _mem_grad(mem_v, sl, dv):
    """The memory values' gradient: ``dv (nb, nh, G, M, Dv)`` summed over batch and blocks."""
    grad = torch.zeros_like(mem_v)
    grad[sl.h0:sl.h0 + sl.nh] = dv.sum(dim=(0, 2))
    return grad
