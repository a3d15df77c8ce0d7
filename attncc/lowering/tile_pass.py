"""The tiles that ``attncc.lowering.maps`` visits: score tiles of one call and their weights.

``TilePass(node, call, heads)`` gathers Q and K/V for the selected query heads (after the
feature map, the Linformer projection, the additive score's ``w`` and memory keys), builds the
block plan in ``BLOCK_M x BLOCK_N`` tiles, and yields per query block the memory tile and each
key block the plan visits, with scores computed as the kernels compute them (score_mod and mask
evaluated on broadcast index arrays, ``attncc.lowering.env``), then the weights under the
kernel's normaliser and statistics folded tile by tile. Array-API code: NumPy arrays and torch
tensors (any device) alike.
"""

from __future__ import annotations

import math

import array_api_compat
import numpy as np

from attncc.bind import namespace
from attncc.lowering.env import Layout, block_scores, raw_scores
from attncc.lowering.features import feature_map
from attncc.lowering.requests import node_kind
from attncc.lowering.states import TopkThreshold, sigmoid
from attncc.plan import build_plan

__all__ = ["BLOCK_M", "BLOCK_N", "TilePass"]

#: Query rows and key columns of the tiles the passes visit.
BLOCK_M, BLOCK_N = 64, 256
_LAYOUT = Layout(4, b=(0,), h=(1,), q_idx=(2,), kv_idx=(3,))


class TilePass:
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
        k, blocks = self.k[b, s], self._key_blocks(part, rows)
        q_idx = _LAYOUT.place("q_idx", self.asarray(rows))

        def kv_idx(start: int, stop: int):
            return _LAYOUT.place("kv_idx", xp.arange(start, stop, device=self.device))

        if self.kind == "linear":  # feature products; the causal mask on PARTIAL blocks
            for n, is_full in blocks:
                start, stop = n * BLOCK_N, min((n + 1) * BLOCK_N, k.shape[-2])
                sc = q @ k[..., start:stop, :].mT
                yield (slice(self.memory + start, self.memory + stop), sc,
                       None if is_full else xp.broadcast_to(kv_idx(start, stop) <= q_idx,
                                                            sc.shape))
            return
        fixed = {}

        def env(start: int, stop: int) -> dict:
            if not fixed:  # built on the first tile that reads it
                batch = xp.arange(self.q.shape[0], device=self.device)[b]
                fixed.update(_LAYOUT.fixed(self.call.sizes, self.call.inputs, batch,
                                           self.asarray(self.heads[s])))
            return {**fixed, "q_idx": q_idx, "kv_idx": kv_idx(start, stop)}

        for start, stop, sc, keep in block_scores(node, q, k, self.call.scale, w, blocks,
                                                  BLOCK_N, env):
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

