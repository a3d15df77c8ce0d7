"""Attention maps and per-row statistics of an attention node, from a kernel's own statistics.

``attention_map`` gives the exact weights ``W`` of ``out = W @ values`` (memory tokens first) for
selected query heads and rows; ``row_stats`` gives per-row statistics for every head at O(N)
memory. Both make one pass over the key blocks the block plan visits (``attncc.plan``; EMPTY
blocks cost nothing) for the rows asked for, with score tiles computed as the kernels compute
them (``attncc.lowering.env``, score_mod and mask on broadcast index arrays), and turn the
scores into weights with the kernel's own normaliser ``norm``:

- softmax, top-k: ``exp(s - lse)`` with the kernel's lse (``return_lse=True``); top-k first
  finds each row's threshold over the same tiles and keeps ``s >= threshold``
  (``attncc.lowering.states.TopkThreshold``, the kernels' tie rule), a second pass;
- sigmoid: ``sigmoid(s)`` of the kept pairs (unnormalised; no ``norm``);
- linear: ``φ(q_i)·φ(k_j) / den_i`` over kept keys, ``den_i = φ(q_i)·Σ_{kept j} φ(k_j)`` the
  kernel's denominator (``denominator``; prefix sums when causal), 0 on a row where it is 0;
- Linformer: the softmax ``P`` over the projected keys, then the weights on tokens ``P·F``;
- Nyström: rows of the effective matrix ``(K1·pinv(K2))·K3`` (``lowrank.nystrom_factors``).

Which statistics each normalisation defines, and the checks of a request (heads, rows, the
memory cap, stat names), are ``attncc.lowering.requests``.

The passes are array-API code: NumPy arrays and torch tensors (any device) alike.
"""

from __future__ import annotations

import math

import array_api_compat
import numpy as np

from attncc.bind import namespace
from attncc.ir.graph import LinearAttention
from attncc.lowering.env import Layout, raw_scores
from attncc.lowering.features import feature_map
from attncc.lowering.lowrank import nystrom_factors
from attncc.lowering.requests import check_stats, node_kind, select
from attncc.lowering.states import TopkThreshold, sigmoid
from attncc.spec.numeric import evaluate

__all__ = ["attention_map", "denominator", "kernel_map", "kernel_stats", "row_stats"]

#: Query rows and key columns of the tiles the passes visit.
BLOCK_M, BLOCK_N = 64, 256
_LAYOUT = Layout(4, b=(0,), h=(1,), q_idx=(2,), kv_idx=(3,))


def kernel_map(kernel, q, k, v, heads, rows, inputs: dict):
    """``kernel.attention_map``: the call checked by the shared prologue, the kernel's lse
    (``kernel(..., return_lse=True)``) where the normalisation has one, then ``attention_map``."""
    node, call = _checked(kernel, q, k, v, inputs)
    heads, rows = select(call.sizes, getattr(node, "memory_tokens", 0), heads, rows,
                         itemsize=call.q.dtype.itemsize)
    return attention_map(node, call, _norm(kernel, node, call, q, k, v, inputs)[1], heads, rows)


def kernel_stats(kernel, q, k, v, stats, return_lse: bool, inputs: dict):
    """``kernel(q, k, v, stats=...)``: ``(out, {name: (B, H, Nq)})`` (``(out, lse, stats)``
    with ``return_lse``) from one kernel call and ``row_stats``."""
    node, call = _checked(kernel, q, k, v, inputs, return_lse)
    names = check_stats(node_kind(node), getattr(node, "normalize", ""), stats)
    out, norm = _norm(kernel, node, call, q, k, v, inputs)
    found = row_stats(node, call, norm, names)
    return (out, norm, found) if return_lse else (out, found)


def _checked(kernel, q, k, v, inputs: dict, return_lse: bool = False):
    """``(node, Call)``: the kernel's attention node and the call through the prologue."""
    from attncc.ir.graph import attention_node
    from attncc.lowering.prologue import prologue
    from attncc.passes.pipeline import lower

    node = kernel.node if kernel.node is not None else attention_node(lower(kernel.spec))[1]
    library = "torch" if array_api_compat.is_torch_array(q) else "numpy"
    return node, prologue(kernel.spec, node, q, k, v, inputs, backend=kernel.backend,
                          library=library, return_lse=return_lse)


def _norm(kernel, node, call, q, k, v, inputs: dict):
    """``(out, norm)``: the kernel's output and its lse (softmax, top-k, Linformer), the linear
    ``denominator``, or None."""
    from attncc.lowering.prologue import lse_refusal

    if lse_refusal(node) is None:
        return kernel(q, k, v, return_lse=True, **inputs)
    out = kernel(q, k, v, **inputs)
    return out, (denominator(node, call) if isinstance(node, LinearAttention) else None)


def denominator(node, call):
    """``den (B, H, Nq)`` of the LinearAttention ``node``: ``φ(q_i)·Σ_{kept j} φ(k_j)``."""
    return _Pass(node, call, np.arange(call.sizes["heads"])).denominator()


def attention_map(node, call, norm, heads, rows):
    """``W (B, len(heads), len(rows), memory_tokens + seq_k)`` in the compute dtype of the
    checked ``call`` (``attncc.lowering.prologue``); ``norm (B, H, Nq)`` the kernel's lse
    (softmax, top-k, Linformer) or ``denominator`` (linear), else None; ``heads``, ``rows`` from
    ``select``."""
    p = _Pass(node, call, heads)
    xp, kind = p.xp, p.kind
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    if kind == "nystrom":
        k1, inverse, k3 = nystrom_factors(p.q, p.k, node.landmarks, call.scale,
                                          rows=p.asarray(ordered))
        weights = (k1 @ inverse) @ k3
    else:
        norm = None if norm is None else p.heads_of(norm)
        weights = xp.zeros((p.q.shape[0], len(heads), len(rows), p.memory + p.k.shape[-2]),
                           dtype=p.q.dtype, device=p.device)
        for i0, i1 in _blocks_of(ordered):
            for part in p.parts():
                for cols, _, _, w in p.weights(part, ordered[i0:i1], norm):
                    weights[(part[0], part[1], slice(i0, i1), cols)] = w
        if kind == "linformer":
            m = p.memory
            weights = xp.concat([weights[..., :m], weights[..., m:] @ call.inputs["F"]], axis=-1)
    if np.any(order != np.arange(len(rows))):
        weights = xp.take(weights, p.asarray(np.argsort(order)), axis=2)
    return weights


def row_stats(node, call, norm, names) -> dict:
    """``{name: (B, H, Nq)}`` for the checked ``names`` (``check_stats``) of the checked ``call``;
    ``norm`` as for ``attention_map``. One pass over the visited blocks (two under top-k), no
    row wider than a tile is kept."""
    sizes = call.sizes
    p = _Pass(node, call, np.arange(sizes["heads"]))
    xp = p.xp
    shape = (sizes["batch"], sizes["heads"], sizes["seq_q"])
    out = {n: xp.zeros(shape, dtype=p.q.dtype, device=p.device) for n in names}
    if "lse" in names:
        out["lse"] = xp.astype(norm, p.q.dtype)
    if "max" in names:
        out["max"] = out["max"] - math.inf
    if p.kind == "nystrom":
        if "mass_first" in names:
            k1, inverse, k3 = nystrom_factors(p.q, p.k, node.landmarks, call.scale)
            out["mass_first"] = ((k1 @ inverse) @ k3[..., :1])[..., 0]
        return out
    norm = None if norm is None else p.heads_of(norm)
    for r0 in range(0, sizes["seq_q"], BLOCK_M):
        rows = np.arange(r0, min(r0 + BLOCK_M, sizes["seq_q"]))
        for part in p.parts():
            for name, value in p.fold(part, rows, norm, names).items():
                out[name][(part[0], part[1], slice(r0, r0 + len(rows)))] = value
    return out


def _blocks_of(rows: np.ndarray):
    """``(i0, i1)`` spans of sorted ``rows`` that fall in one query block."""
    starts = np.flatnonzero(np.diff(rows // BLOCK_M, prepend=-1))
    return zip(starts.tolist(), [*starts[1:].tolist(), len(rows)], strict=True)


class _Pass:
    """Score tiles and weights of one call for query heads ``heads`` (K/V gathered per head)."""

    def __init__(self, node, call, heads: np.ndarray):
        self.node, self.call, self.kind = node, call, node_kind(node)
        # the rule that turns a tile into weights: linear, or the fused node's normalize
        self.rule = self.kind if self.kind in ("linear", "nystrom") else node.normalize
        self.xp = xp = namespace(call.q)
        self.device = array_api_compat.device(call.q)
        self.heads = heads
        h = self.asarray(heads)
        kv = h // call.group
        k = call.k if self.kind != "linformer" else call.inputs["E"] @ call.k
        self.q, self.k = xp.take(call.q, h, axis=1), xp.take(k, kv, axis=1)
        self.memory = getattr(node, "memory_tokens", 0)
        self.w = self.mem = self.plan = None
        if self.kind == "linear":
            omega = call.inputs.get("omega")
            self.q = feature_map(node.feature_map, self.q, omega)
            self.k = feature_map(node.feature_map, self.k, omega)
        elif self.kind != "nystrom":
            from attncc.plan import build_plan

            if node.score == "additive":
                self.w = xp.take(call.inputs["w"], h, axis=0)[None, :, None, None, :]
            if self.memory:
                self.mem = xp.take(call.inputs["mem_k"], kv, axis=0)[None]
            self.plan = build_plan(node, call.sizes, BLOCK_M, BLOCK_N, call.raw_inputs)
        self._sigmoid = sigmoid(xp)

    def asarray(self, values: np.ndarray):
        return self.xp.asarray(values, device=self.device)

    def heads_of(self, norm):
        """The selected heads' part of a ``(B, H, Nq)`` normaliser, in the compute dtype."""
        return self.xp.take(self.xp.astype(norm, self.q.dtype), self.asarray(self.heads), axis=1)

    def denominator(self):
        xp, kq, kk = self.xp, self.q, self.k
        if not self.node.causal:
            return xp.sum(kq * xp.sum(kk, axis=-2, keepdims=True), axis=-1)
        upto = np.minimum(np.arange(kq.shape[-2]), kk.shape[-2] - 1)
        return xp.sum(kq * xp.take(xp.cumulative_sum(kk, axis=-2), self.asarray(upto), axis=-2),
                      axis=-1)

    def parts(self) -> list[tuple]:
        """``(batch index, head-position index, bp, hp)`` of each slice of the plan."""
        bps, hps = (1, 1) if self.plan is None else self.plan.states.shape[:2]
        bs = ([(slice(None), 0)] if bps == 1
              else [(slice(b, b + 1), b) for b in range(self.q.shape[0])])
        hs = ([(slice(None), 0)] if hps == 1
              else [(slice(i, i + 1), int(h)) for i, h in enumerate(self.heads)])
        return [(b, s, bp, hp) for b, bp in bs for s, hp in hs]

    def _key_blocks(self, part, rows: np.ndarray):
        """``[(key block, FULL?)]`` the plan visits for ``rows`` (in one query block)."""
        n_blocks = -(-self.k.shape[-2] // BLOCK_N)
        if self.plan is not None:
            full, partial = self.plan.kv_blocks(part[2], part[3], int(rows[0]) // BLOCK_M)
            return [(int(n), True) for n in full] + [(int(n), False) for n in partial]
        if not self.node.causal:
            return [(n, True) for n in range(n_blocks)]
        return [(n, (n + 1) * BLOCK_N - 1 <= rows[0]) for n in range(n_blocks)
                if n * BLOCK_N <= rows[-1]]

    def tiles(self, part, rows: np.ndarray):
        """``(columns of W, s, keep or None)``: the memory tile, then each visited key block;
        ``s (B', H', rows, cols)`` the final scores (linear: the feature products)."""
        xp, node, (b, s) = self.xp, self.node, part[:2]
        q = xp.take(self.q[b, s], self.asarray(rows), axis=2)
        w = None if self.w is None else self.w[:, s]
        if self.mem is not None:
            yield slice(0, self.memory), raw_scores(q, self.mem[:, s], self.call.scale, w), None
        k, n_keys = self.k[b, s], self.k.shape[-2]
        q_idx = _LAYOUT.place("q_idx", self.asarray(rows))
        fixed = None
        for n, is_full in self._key_blocks(part, rows):
            start, stop = n * BLOCK_N, min((n + 1) * BLOCK_N, n_keys)
            kv_idx = _LAYOUT.place("kv_idx", xp.arange(start, stop, device=self.device))
            if self.kind == "linear":
                sc = q @ k[..., start:stop, :].mT
                yield (slice(self.memory + start, self.memory + stop), sc,
                       None if is_full else xp.broadcast_to(kv_idx <= q_idx, sc.shape))
                continue
            sc = raw_scores(q, k[..., start:stop, :], self.call.scale, w)
            if fixed is None and (node.score_mod is not None or not is_full):
                batch = xp.arange(self.q.shape[0], device=self.device)[b]
                fixed = _LAYOUT.fixed(self.call.sizes, self.call.inputs, batch,
                                      self.asarray(self.heads[s]))
            if node.score_mod is not None:
                value = evaluate(node.score_mod, {**fixed, "q_idx": q_idx, "kv_idx": kv_idx,
                                                  "score": sc}, xp)
                sc = _full(xp, value, sc)
            keep = None
            if not is_full:
                env = {**fixed, "q_idx": q_idx, "kv_idx": kv_idx}
                keep = xp.broadcast_to(xp.asarray(evaluate(node.mask.expr, env, xp)), sc.shape)
            yield slice(self.memory + start, self.memory + stop), sc, keep

    def weights(self, part, rows: np.ndarray, norm):
        """``(columns, s, keep, W)`` of each tile (``tiles``) with its weights; ``norm`` the
        selected heads' normaliser (``heads_of``)."""
        xp = self.xp
        threshold = None
        if self.rule == "topk":
            first = TopkThreshold(self.node.topk, (*self.q[part[0], part[1]].shape[:2],
                                                   len(rows)), self.q)
            for _, sc, keep in self.tiles(part, rows):
                first.update(sc, keep)
            threshold = first.value()
        if norm is not None:
            norm = xp.take(norm[part[0], part[1]], self.asarray(rows), axis=2)[..., None]
            empty = (norm == -math.inf) if self.rule != "linear" else (norm == 0)
            norm = xp.where(empty, math.inf, norm)
        for cols, sc, keep in self.tiles(part, rows):
            if threshold is not None:
                keep = TopkThreshold.keeps(sc, threshold, keep)
            if self.rule == "sigmoid":
                w = self._sigmoid(sc)
            elif self.rule == "linear":
                w = sc / norm
            else:
                w = xp.exp(sc - norm)
            yield cols, sc, keep, (w if keep is None else xp.where(keep, w, 0.0))

    def fold(self, part, rows: np.ndarray, norm, names) -> dict:
        """The statistics ``names`` (but lse) of ``rows`` folded tile by tile."""
        xp = self.xp
        acc = {}

        def add(name, value):
            acc[name] = value if name not in acc else acc[name] + value

        for cols, sc, keep, w in self.weights(part, rows, norm):
            if "max" in names:
                kept = sc if keep is None else xp.where(keep, sc, -math.inf)
                top = xp.max(kept, axis=-1)
                acc["max"] = top if "max" not in acc else xp.maximum(acc["max"], top)
            if "entropy" in names:
                add("entropy", -xp.sum(xp.where(w > 0, w * xp.log(xp.where(w > 0, w, 1.0)),
                                                0.0), axis=-1))
            if cols.start < self.memory:
                add("mass_memory", xp.sum(w, axis=-1))
                continue
            if cols.start == self.memory:
                add("mass_first", w[..., 0])
            if "mean_distance" in names:
                start = cols.start - self.memory
                dist = xp.abs(self.asarray(rows)[:, None]
                              - xp.arange(start, start + w.shape[-1], device=self.device))
                add("distance", xp.sum(w * xp.astype(dist, w.dtype), axis=-1))
                add("seq_mass", xp.sum(w, axis=-1))
        if "mean_distance" in names and "seq_mass" in acc:
            mass = acc.pop("seq_mass")
            acc["mean_distance"] = xp.where(mass > 0, acc.pop("distance"), 0.0) / xp.where(
                mass > 0, mass, 1.0)
        return {n: acc[n] for n in names if n in acc and n != "lse"}


def _full(xp, value, like):
    """A score_mod's value broadcast to the tile ``like`` in its dtype."""
    if isinstance(value, (int, float)):
        return xp.full(like.shape, float(value), dtype=like.dtype,
                       device=array_api_compat.device(like))
    return xp.broadcast_to(xp.astype(xp.asarray(value), like.dtype), like.shape)
