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

from attncc.ir.graph import LinearAttention, attention_node
from attncc.lowering.lowrank import nystrom_factors
from attncc.lowering.prologue import prologue
from attncc.lowering.requests import check_stats, has_lse, node_kind, select
from attncc.lowering.tile_pass import BLOCK_M, TilePass
from attncc.passes.pipeline import lower

__all__ = ["attention_map", "denominator", "kernel_map", "kernel_stats", "row_stats"]

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
    node = kernel.node if kernel.node is not None else attention_node(lower(kernel.spec))[1]
    library = "torch" if array_api_compat.is_torch_array(q) else "numpy"
    return node, prologue(kernel.spec, node, q, k, v, inputs, backend=kernel.backend,
                          library=library, return_lse=return_lse)


def _norm(kernel, node, call, q, k, v, inputs: dict):
    """``(out, norm)``: the kernel's output and its lse (softmax, top-k, Linformer), the linear
    ``denominator``, or None."""
    if has_lse(node_kind(node), getattr(node, "normalize", "")):
        return kernel(q, k, v, return_lse=True, **inputs)
    out = kernel(q, k, v, **inputs)
    return out, (denominator(node, call) if isinstance(node, LinearAttention) else None)


def denominator(node, call):
    """``den (B, H, Nq)`` of the LinearAttention ``node``: ``φ(q_i)·Σ_{kept j} φ(k_j)``."""
    return TilePass(node, call, np.arange(call.sizes["heads"])).denominator()


def attention_map(node, call, norm, heads, rows):
    """``W (B, len(heads), len(rows), memory_tokens + seq_k)`` in the compute dtype of the
    checked ``call`` (``attncc.lowering.prologue``); ``norm (B, H, Nq)`` the kernel's lse
    (softmax, top-k, Linformer) or ``denominator`` (linear), else None; ``heads``, ``rows`` from
    ``select``."""
    p = TilePass(node, call, heads)
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
    p = TilePass(node, call, np.arange(sizes["heads"]))
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
