"""The flash pattern over the block plan: forward with an online softmax, recomputing backward.

The forward folds each step's tiles into the shared per-row states
(``attncc.lowering.states.fold``: online softmax, sigmoid sum, top-k's two passes). Saved for
backward: q, k, v, out and per-row statistics (row max, 1/sum, top-k threshold) — never an N×N
matrix. The backward recomputes each tile (FlashAttention-2: ``dS = P ∘ (dP − D)``, with
``D = rowsum(P ∘ dP)`` recomputed exactly rather than taken from ``rowsum(dO ∘ O)``, see
``_exact_delta``), then dq, dk and the gradients of score_mod inputs and memory tokens as
explicit products or by ``torch.autograd.grad`` on the tile's scores (``backward``).
``FlashAttention`` (a ``torch.autograd.Function``) ties the two together.
"""

from __future__ import annotations

import torch

from attncc.lowering.states import TopkThreshold, fold

from .tiles import Problem, score_slope

#: Per-row statistics kept by the forward, with the value of rows no step visits.
STATS = {"lse": float("-inf"), "row_max": 0.0, "inv_sum": 0.0, "thr": float("-inf")}


class FlashAttention(torch.autograd.Function):
    """``apply(problem, names, q5, k4, v4, *tensors) -> (out5, lse5)``: q5 ``(B, Hkv, group,
    Nq, D)``, k4, v4 ``(B, Hkv, Nk, D)``.

    Inside, q, k, v are block-major (``Problem.to_blocks``). ``tensors`` are the floating
    inputs named by ``names`` (in the compute dtype), which receive gradients; integer inputs
    live in ``problem.inputs``. ``lse5`` is not differentiable (it is empty for sigmoid, which
    has none).
    """

    @staticmethod
    def forward(ctx, pb: Problem, names: tuple, q5, k4, v4, *tensors):
        inputs = {**pb.inputs, **dict(zip(names, tensors, strict=True))}
        q6, kb, vb = pb.to_blocks(q5), pb.to_blocks(k4, kv=True), pb.to_blocks(v4, kv=True)
        out6, stats = forward(pb, q6, kb, vb, inputs)
        lse = pb.from_blocks(stats.pop("lse")) if "lse" in stats else q5.new_empty(0)
        ctx.pb, ctx.names, ctx.stats = pb, names, tuple(stats)
        ctx.save_for_backward(q6, kb, vb, out6, *stats.values(), *tensors)
        ctx.mark_non_differentiable(lse)
        return pb.from_blocks(out6), lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        pb, names, n_stats = ctx.pb, ctx.names, len(ctx.stats)
        q6, kb, vb, out6, *rest = ctx.saved_tensors
        stats = dict(zip(ctx.stats, rest[:n_stats], strict=True))
        inputs = {**pb.inputs, **dict(zip(names, rest[n_stats:], strict=True))}
        wanted = [name for i, name in enumerate(names) if ctx.needs_input_grad[5 + i]]
        dq6, dk, dv, dinp = backward(pb, (q6, kb, vb, out6), stats, inputs, pb.to_blocks(dout),
                                     wanted)
        return (None, None, pb.from_blocks(dq6).to(q6.dtype),
                pb.from_blocks(dk, kv=True).to(kb.dtype), pb.from_blocks(dv, kv=True).to(vb.dtype),
                *(dinp.get(name) for name in names))


def forward(pb: Problem, q6, k4, v4, inputs: dict):
    """``(out6, stats)`` for block-major ``q6 (nQ, B, Hkv, group, bm, D)``, ``k4``/``v4``
    ``(nK, B, Hkv, bn, D)``: ``out6`` has q6's layout; ``stats`` maps the ``STATS`` the
    normalization has (lse, row_max, inv_sum for softmax and top-k; thr for top-k; none for
    sigmoid) to ``(..., bm, 1)`` tensors.

    The per-row states are the shared ones, in place (no autograd here). The backward rebuilds P
    as ``exp(s - row_max) * inv_sum`` rather than ``exp(s - lse)``: rounding lse (large where
    scores are large) would scale every P of a row by one common factor.
    """
    node = pb.node
    names = {"sigmoid": (), "topk": tuple(STATS)}.get(node.normalize, tuple(STATS)[:3])
    acc = pb.acc
    stats = {"out": q6.new_zeros((*q6.shape[:-1], v4.shape[-1]), dtype=acc),
             **{n: q6.new_full((*q6.shape[:-1], 1), STATS[n], dtype=acc) for n in names}}
    for step in pb.schedule.steps:
        q = pb.rows(q6, step)

        def tiles(step=step, q=q):
            for chunk, k, v in pb.tiles(step, k4, v4, inputs):
                s = pb.scores(step, chunk, q, k, inputs)
                # fresh score tiles may be overwritten; a broadcast one is not contiguous
                yield s, None, v, s.is_contiguous()

        done, thr = fold(node, q.shape[:-1], v4.shape[-1], q.new_empty((), dtype=acc), tiles,
                         pb.mixed)
        values = {**done._asdict(), "thr": thr}
        for name, x in stats.items():
            pb.put_rows(x, step, values[name])
    return stats.pop("out"), stats


def backward(pb: Problem, saved: tuple, stats: dict, inputs: dict, dout6, grad_inputs: list):
    """Gradients ``(dq6, dk4, dv4, {input name: grad})`` of the tensors ``forward`` read,
    ``saved = (q6, k4, v4, out6)``; ``grad_inputs`` names the floating inputs that need one
    (memory tokens included).

    Per step, each tile's scores are recomputed once where the step's tiles fit the schedule's
    memory bound (``tile_elems`` score elements kept: P and dP, and the derivative of score_mod
    or the tile's autograd graph), else a second time after the delta pass (``_exact_delta``).
    Where no score_mod input needs a gradient and the score is a dot product, dq and dk are
    explicit products, ``dS' = dS ∘ d score_mod / d score`` (``tiles.score_slope``, evaluated on
    the tile), ``dq = dS' @ k · scale``, ``dk = dS'ᵀ @ q · scale``; otherwise
    ``torch.autograd.grad`` of the tile's scores, which also yields the inputs' gradients.
    """
    q6, k4, v4, out6 = saved
    norm = pb.node.normalize
    dq6, dk4, dv4 = (torch.zeros_like(x, dtype=pb.acc) for x in (q6, k4, v4))
    dinp = {name: torch.zeros_like(inputs[name]) for name in grad_inputs}
    leaves = {name: inputs[name].detach().requires_grad_() for name in grad_inputs}
    explicit = (pb.node.score == "dot" and not set(dinp) - {"mem_k", "mem_v"}
                and (pb.node.score_mod is None or score_slope(pb.node.score_mod) is not None))
    traced = {**inputs, **leaves}
    if norm != "sigmoid":
        stats = {**stats, "delta": (dout6 * out6).sum(-1, keepdim=True)}
    for step in pb.schedule.steps:
        sl = step.slice
        q, do = pb.rows(q6, step), pb.rows(dout6, step)
        stat = dict.fromkeys(STATS) | {n: pb.rows(x, step) for n, x in stats.items()}

        def score(chunk, k, q=q, step=step):
            """``(s, d, q_leaf, k_leaf)``: the tile's scores and their derivative factor
            (explicit), or the scores with their autograd graph from leaves."""
            if explicit:
                return (*pb.scores(step, chunk, q, k, inputs, slope=True), None, None)
            with torch.enable_grad():  # memory keys: a gradient only where mem_k wants one
                q_leaf = q.detach().requires_grad_()
                k_leaf = k.detach().requires_grad_(chunk is not None or "mem_k" in dinp)
                return pb.scores(step, chunk, q_leaf, k_leaf, traced), None, q_leaf, k_leaf

        tiles, budget = [], pb.schedule.tile_elems
        for chunk, k, v in pb.tiles(step, k4, v4, inputs):
            kept = None
            if budget > 0 and norm != "sigmoid":  # the delta pass needs P and dP anyway
                s, *rest = score(chunk, k)
                kept = (s, *rest, _probs(s.detach(), stat), pb.mm(do, v.mT))
                budget -= s.numel()
            tiles.append((chunk, k, v, kept))
        if norm != "sigmoid":
            stat["delta"] = _exact_delta(pb, step, q, do, tiles, inputs, stat)
        dq = torch.zeros_like(q, dtype=pb.acc)
        for chunk, k, v, kept in tiles:
            s, d, q_leaf, k_leaf, *pdp = kept if kept is not None else (*score(chunk, k), None)
            ds, dv = _tile_grads(pb.mm, norm, s.detach(), v, do, stat, *pdp)
            dk = None
            if explicit:
                ds = ds if d is None else ds.mul_(d)
                dq += pb.mm(ds, k) * pb.scale
                if chunk is not None or "mem_k" in dinp:
                    dk = pb.mm(ds.mT, q) * pb.scale
            else:
                wrt = [q_leaf, *([k_leaf] if k_leaf.requires_grad else []), *leaves.values()]
                dq_t, *named = torch.autograd.grad(s, wrt, ds, allow_unused=True)
                dk = named.pop(0).to(pb.acc) if k_leaf.requires_grad else None
                dq += dq_t
                for name, g in zip(leaves, named, strict=True):
                    if g is not None:
                        dinp[name] += g
            if chunk is not None:
                pb.add_cols(dk4, sl, chunk, dk)
                pb.add_cols(dv4, sl, chunk, dv)
            else:  # memory tokens (1, nh, 1, M, D): summed over batch entries and query blocks
                for name, g in (("mem_k", dk), ("mem_v", dv)):
                    if name in dinp:
                        dinp[name][sl.h0:sl.h0 + sl.nh] += g.sum(dim=(0, 2))
        pb.put_rows(dq6, step, dq)
    return dq6, dk4, dv4, dinp


def _exact_delta(pb: Problem, step, q, do, tiles, inputs: dict, stat: dict):
    """``D' = D + rowsum(P ∘ (dP − D))``: the delta corrected so that every row of dS sums to 0.

    Exact arithmetic gives ``rowsum(dS) = 0``; in floating point the residual of
    ``rowsum(dO ∘ O)`` is ~1 ulp of the row's terms (O's own rounding), and it reaches the
    gradients multiplied by whatever weights dS: large keys where the softmax is nearly one-hot
    (hard attention's dq, exactly zero) and inputs read by position (an ALiBi slope multiplies
    dS by ``q_idx - kv_idx``). Removing it, as autograd through a softmax does, needs P and dP of
    every tile of the step: ``tiles`` are ``(chunk, k, v, kept)``, ``kept`` ending in P and dP
    (None: recomputed here, and again for the gradients).
    """
    delta = stat["delta"]
    total = torch.zeros_like(delta)
    for chunk, k, v, kept in tiles:
        if kept is None:
            p, dp = _probs(pb.scores(step, chunk, q, k, inputs), stat), pb.mm(do, v.mT)
        else:
            p, dp = kept[-2:]
        total += (p * (dp - delta)).sum(-1, keepdim=True)
    return delta + total


def _probs(s, stat: dict):
    p = torch.sub(s, stat["row_max"]).exp_().mul_(stat["inv_sum"])
    if stat["thr"] is not None:
        p = torch.where(TopkThreshold.keeps(s, stat["thr"]), p, 0.0)
    return p


def _tile_grads(mm, norm: str, s, v, do, stat: dict, p=None, dp=None):
    """``(dS, dV_tile)`` of one tile from its recomputed scores and the saved row statistics
    (``p``, ``dp``: P and dO @ Vᵀ where the delta pass kept them); ``mm`` the products
    (``Problem.mm``)."""
    dp = mm(do, v.mT) if dp is None else dp  # fresh: dS is computed into it
    if norm == "sigmoid":
        w = torch.sigmoid(s)
        return dp.mul_(w).mul_(1 - w), mm(w.mT, do)
    p = _probs(s, stat) if p is None else p
    return dp.sub_(stat["delta"]).mul_(p), mm(p.mT, do)
