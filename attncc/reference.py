"""The executable meaning of a spec (DESIGN §3): dense, readable, float64.

``reference`` is what every backend is judged against. It materializes the full score matrix and
follows the steps of the spec language in order: low-rank projection, memory tokens, score,
score_mod, mask, normalization, aggregation. ``attend`` is the same code on any array-API namespace
(NumPy, or torch float64 for exact gradients in the conformance suite). Every normalisation is
computed as a weight matrix over the value rows, ``out = W @ values``: ``attention_map`` returns
those weights (on tokens) and ``attention_stats`` the per-row statistics defined on them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import array_api_compat
import numpy as np

from attncc.bind import Bound, bind, shared_kv
from attncc.errors import InputError
from attncc.lowering.requests import check_stats, has_lse, select
from attncc.plan import host_array
from attncc.spec.load import load_spec
from attncc.spec.numeric import evaluate, logistic

__all__ = ["attend", "attention_map", "attention_stats", "kept_pairs", "reference",
           "spec_kind"]


def reference(spec, q, k, v, *, return_lse: bool = False, **inputs):
    """Float64 NumPy output ``(B, Hq, Nq, Dv)`` (and lse ``(B, Hq, Nq)`` with ``return_lse``).

    ``spec`` is anything ``load_spec`` takes; tensors may be NumPy arrays or torch tensors of any
    floating dtype; they are converted to float64 NumPy first.
    """
    q, k, v, inputs = _host64(q, k, v, inputs)
    return attend(spec, q, k, v, inputs, return_lse=return_lse)


def attend(spec, q, k, v, inputs: dict, *, return_lse: bool = False):
    """The reference computation on the arrays' own namespace and dtype (no conversion)."""
    spec = load_spec(spec)
    bound = bind(spec, q, k, v, inputs)
    k, v = shared_kv(q, k, v)
    if return_lse and not has_lse(spec_kind(spec), spec.normalize):
        raise InputError("return_lse: nystrom approximates the softmax and has no log-sum-exp"
                         if spec_kind(spec) == "nystrom" else
                         f"return_lse: the log-sum-exp exists for normalize softmax and topk, "
                         f"not {spec.normalize}")
    rows = _weights(spec, bound, q, k, v, array_api_compat.array_namespace(q))
    out = rows.weights @ rows.values
    return (out, rows.lse) if return_lse else out


def attention_map(spec, q, k, v, *, heads=None, rows=None, **inputs):
    """The exact attention weights ``(B, len(heads), len(rows), memory_tokens + seq_k)`` of
    ``spec``, float64 NumPy (``heads``/``rows``: query heads and rows, None for all).

    Row ``i`` holds the weight of each value token in ``out_i = Σ_j W_ij v_j``: memory tokens
    first, then the keys. Per normalisation: softmax and top-k the softmax probabilities (0
    outside the kept keys; top-k keeps every key tied at the K-th score); sigmoid the
    unnormalised ``sigmoid(s)`` of kept pairs; linear ``φ(q_i)·φ(k_j) / Σ_j φ(q_i)·φ(k_j)`` over
    kept keys (0 where the sum is 0); Linformer the weights on tokens, ``P·F`` for ``P`` the
    softmax over the projected keys (memory columns as they are); Nyström the effective matrix
    ``softmax(Q K̃ᵀ)·pinv(softmax(Q̃ K̃ᵀ))·softmax(Q̃ Kᵀ)`` (not normalised, may be negative).
    """
    q, k, v, inputs = _host64(q, k, v, inputs)
    spec = load_spec(spec)
    bound = bind(spec, q, k, v, inputs)
    heads, rows = select(bound.sizes, spec.memory_tokens, heads, rows, itemsize=8)
    weights = _weights(spec, bound, q, k, v, np).weights
    if spec.lowrank is not None and spec.lowrank.method == "linformer":
        m = spec.memory_tokens
        weights = np.concatenate([weights[..., :m], weights[..., m:] @ bound.inputs["F"]], -1)
    return weights[:, heads][:, :, rows]


def attention_stats(spec, q, k, v, *, stats, **inputs) -> dict:
    """Per-row statistics ``{name: (B, H, Nq) float64}`` by their definitions on the dense
    weights of ``attention_map`` (``attncc.lowering.requests`` documents each and which
    normalisations define it)."""
    q, k, v, inputs = _host64(q, k, v, inputs)
    spec = load_spec(spec)
    bound = bind(spec, q, k, v, inputs)
    names = check_stats(spec_kind(spec), spec.normalize, stats)
    rows = _weights(spec, bound, q, k, v, np)
    w, m = rows.weights, spec.memory_tokens
    seq = w[..., m:]
    dist = np.abs(np.arange(w.shape[2])[:, None] - np.arange(seq.shape[-1])[None, :])
    seq_mass = seq.sum(-1)
    plogp = np.where(w > 0, w * np.log(np.where(w > 0, w, 1.0)), 0.0)
    every = {"lse": lambda: rows.lse, "max": lambda: rows.row_max,
             "entropy": lambda: -plogp.sum(-1), "mass_first": lambda: seq[..., 0],
             "mass_memory": lambda: w[..., :m].sum(-1),
             "mean_distance": lambda: np.where(seq_mass > 0, (seq * dist).sum(-1), 0.0)
             / np.where(seq_mass > 0, seq_mass, 1.0)}
    return {name: every[name]() for name in names}


def spec_kind(spec) -> str:
    """softmax | topk | sigmoid | linear | linformer | nystrom: what ``attncc.lowering.maps``
    calls the normalisation of ``spec`` (``normalize``, or the low-rank method)."""
    if spec.lowrank is not None:
        return spec.lowrank.method
    return spec.normalize


class _Weights(NamedTuple):
    """``out = weights @ values``: weights ``(B, H, Nq, C)`` over the C value rows (memory
    first; Linformer's projected keys); ``lse`` and ``row_max`` (max kept score, -inf on a row
    with none) ``(B, H, Nq)`` where the normalisation has them, else None."""

    weights: object
    values: object
    lse: object = None
    row_max: object = None


def _weights(spec, bound: Bound, q, k, v, xp) -> _Weights:
    """The weights of every query row over every value row, in the order of the spec."""
    if spec.lowrank is not None and spec.lowrank.method == "linformer":
        k = xp.matmul(bound.inputs["E"], k)
        v = xp.matmul(bound.inputs["F"], v)
    heads = xp.arange(bound.sizes["heads"]) // bound.group  # the kv head of each query head
    k, v = xp.take(k, heads, axis=1), xp.take(v, heads, axis=1)
    if spec.lowrank is not None and spec.lowrank.method == "nystrom":
        return _Weights(_nystrom(spec.lowrank.size, bound.scale, q, k, xp), v)
    if spec.normalize == "linear":
        return _Weights(_linear(spec, bound, q, k, xp), v)
    scores = _scores(spec, bound, q, k, xp)
    if spec.score_mod is not None:
        env = {**_index_env(bound.sizes, bound.inputs, scores.shape, xp), "score": scores}
        scores = _broadcast(evaluate(spec.score_mod, env, xp), scores, xp)
    keep = kept_pairs(spec, bound.sizes, bound.inputs, scores.shape, xp)
    if spec.score_mod is not None and spec.score_mod.has(-math.inf):
        keep = xp.logical_and(keep, scores > -math.inf)  # a -inf score drops its pair
    if spec.memory_tokens:
        mem_k = xp.take(bound.inputs["mem_k"], heads, axis=0)
        mem_v = xp.take(bound.inputs["mem_v"], heads, axis=0)
        mem_scores = _scores(spec, bound, q, xp.broadcast_to(mem_k, (q.shape[0], *mem_k.shape)),
                             xp)
        scores = xp.concat([mem_scores, scores], axis=-1)
        keep = xp.concat([xp.ones(mem_scores.shape, dtype=xp.bool), keep], axis=-1)
        v = xp.concat([xp.broadcast_to(mem_v, (v.shape[0], *mem_v.shape)), v], axis=-2)
    if spec.normalize == "topk":
        keep = xp.logical_and(keep, scores >= _kth_largest(scores, keep, spec.topk, xp))
    row_max = xp.max(xp.where(keep, scores, xp.full_like(scores, -math.inf)), axis=-1)
    if spec.normalize == "sigmoid":
        sig = logistic(scores, xp)
        return _Weights(xp.where(keep, sig, xp.zeros_like(scores)), v, None, row_max)
    weights, lse = _softmax(scores, keep, xp)
    return _Weights(weights, v, lse, row_max)


def _scores(spec, bound: Bound, q, k, xp):
    """Raw scores (B, H, Nq, Nk) before score_mod: scaled dot product or additive (Bahdanau)."""
    if spec.score == "additive":
        w = bound.inputs["w"]
        hidden = xp.tanh(q[:, :, :, None, :] + k[:, :, None, :, :])
        return xp.sum(hidden * w[None, :, None, None, :], axis=-1)
    scale = bound.scale
    return scale * xp.matmul(q, xp.matrix_transpose(k))


def _index_env(sizes: dict, inputs: dict, shape, xp) -> dict:
    """b, h, q_idx, kv_idx as broadcastable integer arrays, with the sizes and the inputs."""
    def axis(n, dim):
        view = [1, 1, 1, 1]
        view[dim] = n
        return xp.reshape(xp.arange(n, dtype=xp.int64), tuple(view))

    b, h, nq, nk = shape
    return {**sizes, **inputs, "b": axis(b, 0), "h": axis(h, 1),
            "q_idx": axis(nq, 2), "kv_idx": axis(nk, 3)}


def kept_pairs(spec, sizes: dict, inputs: dict, shape, xp):
    """Bool ``shape`` (B, H, Nq, Nk): the pairs the mask of ``spec`` keeps at ``sizes`` (every
    one without a mask), on namespace ``xp``; ``inputs`` are those the mask reads."""
    if spec.mask is None:
        return xp.ones(shape, dtype=xp.bool)
    env = _index_env(sizes, inputs, shape, xp)
    return xp.broadcast_to(xp.asarray(evaluate(spec.mask, env, xp)), shape)


def _broadcast(value, like, xp):
    if isinstance(value, (int, float)):
        return xp.full(like.shape, float(value), dtype=like.dtype)
    return xp.broadcast_to(xp.astype(value, like.dtype), like.shape)


def _kth_largest(scores, keep, kk: int, xp):
    """Per row, the K-th largest kept score, or -inf where fewer than K are kept."""
    masked = xp.where(keep, scores, xp.full_like(scores, -math.inf))
    n = scores.shape[-1]
    if kk >= n:
        return xp.full_like(scores[..., :1], -math.inf)
    return xp.sort(masked, axis=-1)[..., n - kk:n - kk + 1]


def _softmax(scores, keep, xp):
    """Softmax weights over kept keys and the lse; a row with no kept key gives 0, -inf."""
    neg_inf = xp.full_like(scores, -math.inf)
    masked = xp.where(keep, scores, neg_inf)
    row_max = xp.max(masked, axis=-1, keepdims=True)
    any_kept = xp.any(keep, axis=-1, keepdims=True)
    safe_max = xp.where(any_kept, row_max, xp.zeros_like(row_max))
    # exp of the masked scores: a removed pair is exp(-inf) = 0 and never overflows, so its
    # gradient is 0 too (exp of a large removed score under where() would give inf * 0 = nan).
    weights = xp.exp(masked - safe_max)
    total = xp.sum(weights, axis=-1, keepdims=True)
    denom = xp.where(any_kept, total, xp.ones_like(total))
    lse = xp.where(any_kept, safe_max + xp.log(denom), xp.full_like(total, -math.inf))
    return weights / denom, lse[..., 0]


def _features(spec, bound: Bound, x, xp):
    """The linear-attention feature map φ applied to the last axis of x."""
    if spec.feature_map == "elu1":
        return xp.where(x > 0, x + 1.0, xp.exp(xp.minimum(x, xp.zeros_like(x))))
    if spec.feature_map == "relu":
        return xp.maximum(x, xp.zeros_like(x))
    omega = bound.inputs["omega"]
    xs = x * bound.sizes["head_dim"] ** -0.25
    projected = xp.matmul(xs, xp.matrix_transpose(xp.astype(omega, x.dtype)))
    norm = xp.sum(xs * xs, axis=-1, keepdims=True) / 2.0
    return xp.exp(projected - norm) / math.sqrt(spec.features)


def _linear(spec, bound: Bound, q, k, xp):
    """W_ij = φ(q_i)·φ(k_j) / Σ_j φ(q_i)·φ(k_j) over kept j (j ≤ i when the mask is causal),
    0 on a row whose sum is 0."""
    weights = xp.matmul(_features(spec, bound, q, xp),
                        xp.matrix_transpose(_features(spec, bound, k, xp)))
    if spec.mask is not None:
        keep = kept_pairs(spec, bound.sizes, bound.inputs, weights.shape, xp)
        weights = xp.where(keep, weights, xp.zeros_like(weights))
    denom = xp.sum(weights, axis=-1, keepdims=True)
    safe = xp.where(denom == 0, xp.ones_like(denom), denom)
    return xp.where(denom == 0, xp.zeros_like(weights), weights / safe)


def _nystrom(m: int, scale: float, q, k, xp):
    """The effective weights of Nyström attention (Xiong et al. 2021) with ``m`` segment-mean
    landmarks and the exact pinv; k has one head per query head."""

    def landmarks(x):
        b, h, n, d = x.shape
        return xp.mean(xp.reshape(x, (b, h, m, n // m, d)), axis=3)

    def softmax(x):
        e = xp.exp(x - xp.max(x, axis=-1, keepdims=True))
        return e / xp.sum(e, axis=-1, keepdims=True)

    q_land, k_land = landmarks(q), landmarks(k)
    kernel_1 = softmax(scale * xp.matmul(q, xp.matrix_transpose(k_land)))
    kernel_2 = softmax(scale * xp.matmul(q_land, xp.matrix_transpose(k_land)))
    kernel_3 = softmax(scale * xp.matmul(q_land, xp.matrix_transpose(k)))
    return xp.matmul(xp.matmul(kernel_1, xp.linalg.pinv(kernel_2)), kernel_3)


def _host64(q, k, v, inputs: dict) -> tuple:
    """``(q, k, v, inputs)`` as host NumPy arrays (``attncc.plan.host_array``): q, k, v in
    float64, the floating inputs too (a wrong dtype is left for bind() to report)."""
    host = {n: host_array(x) for n, x in inputs.items()}
    return (*(host_array(x).astype(np.float64, copy=False) for x in (q, k, v)),
            {n: x.astype(np.float64, copy=False) if x.dtype.kind == "f" else x
             for n, x in host.items()})
