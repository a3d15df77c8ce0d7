"""The checks of a map or statistics request, and which normalisation defines which statistic.

Statistics (``STATS``), each ``(B, H, Nq)`` in the compute dtype (``attncc.lowering.maps``
computes them, ``attncc.reference.attention_stats`` by these definitions on dense weights); on a
row with no kept key lse and max are -inf and the others 0. ``DEFINED`` lists, per normalisation
(``node_kind``), the ones it defines:

- ``lse``: log-sum-exp of the kept scores, the kernel's (softmax, top-k, Linformer);
- ``max``: the largest kept score (softmax, top-k, sigmoid, Linformer);
- ``entropy``: ``-Σ_j W_ij log W_ij`` (normalised weights: softmax, top-k, linear, Linformer
  over its projected keys);
- ``mass_first``: the weight on the first key token, kv_idx 0 (the usual attention sink; not
  Linformer, whose columns are projections);
- ``mass_memory``: the summed weight on the memory tokens (0 without them; every kind);
- ``mean_distance``: ``Σ_j W_ij |i - j| / Σ_j W_ij`` over the key tokens (nonnegative weights on
  tokens: softmax, top-k, sigmoid, linear).

Every refusal is one InputError naming the argument (``heads``, ``rows``, ``stats``), what was
expected and what was received.
"""

from __future__ import annotations

import numpy as np

from attncc.errors import InputError
from attncc.ir.graph import LinearAttention, Nystrom

__all__ = ["DEFINED", "MAP_CAP", "STATS", "check_stats", "has_lse", "node_kind", "select"]

#: Bytes above which a map request is refused (pass fewer rows or heads).
MAP_CAP = 2 << 30
STATS = ("lse", "max", "entropy", "mass_first", "mass_memory", "mean_distance")
DEFINED = {
    "softmax": STATS, "topk": STATS,
    "sigmoid": ("max", "mass_first", "mass_memory", "mean_distance"),
    "linear": ("entropy", "mass_first", "mass_memory", "mean_distance"),
    "linformer": ("lse", "max", "entropy", "mass_memory"),
    "nystrom": ("mass_first", "mass_memory"),
}
_WHY = {"sigmoid": "its weights are not normalised",
        "linear": "its weights are feature products, not softmax scores",
        "linformer": "its key columns are projections of tokens",
        "nystrom": "its effective weights may be negative and have no scores"}


def node_kind(node) -> str:
    """softmax | topk | sigmoid | linear | linformer | nystrom for an attention node."""
    if isinstance(node, Nystrom):
        return "nystrom"
    if isinstance(node, LinearAttention):
        return "linear"
    return "linformer" if node.projection is not None else node.normalize


def has_lse(kind: str, normalize: str) -> bool:
    """Whether attention of ``kind`` (``node_kind``) with this ``normalize`` has a log-sum-exp
    (``DEFINED``: softmax, top-k, and Linformer over either)."""
    return "lse" in DEFINED[kind] and (kind != "linformer" or "lse" in DEFINED[normalize])


def check_stats(kind: str, normalize: str, stats) -> tuple[str, ...]:
    """``stats`` as a tuple of names, each one ``DEFINED`` for ``kind`` (and, for Linformer,
    its ``normalize``); InputError naming the first that is not."""
    names = (stats,) if isinstance(stats, str) else tuple(stats)
    defined = [n for n in DEFINED[kind] if kind != "linformer" or n in DEFINED[normalize]]
    for name in names:
        if name not in STATS:
            raise InputError(f"stats: expected names from {', '.join(STATS)}; got {name!r}")
        if name not in defined:
            label = f"low-rank {kind}" if kind in ("linformer", "nystrom") else f"normalize {kind}"
            why = _WHY[kind]
            if kind == "linformer" and name not in DEFINED[normalize]:
                label, why = f"{label} with normalize {normalize}", _WHY[normalize]
            raise InputError(f"stats: {name!r} is not defined for {label} ({why}); expected "
                             f"some of {', '.join(defined)}; got {name!r}")
    return names


def select(sizes: dict, memory_tokens: int, heads, rows, *, itemsize: int):
    """``(heads, rows)`` as int64 NumPy arrays (None: all), checked against ``sizes``, for a map
    of ``itemsize``-byte weights; InputError naming the argument when out of range or when the
    map would take more than ``MAP_CAP`` bytes."""
    heads = _indices("heads", heads, sizes["heads"], "query head numbers")
    rows = _indices("rows", rows, sizes["seq_q"], "query rows")
    keys = memory_tokens + sizes["seq_k"]
    size = sizes["batch"] * len(heads) * len(rows) * keys * itemsize
    if size > MAP_CAP:
        raise InputError(
            f"rows: expected a map of at most {MAP_CAP / 2**30:g} GiB; got {size / 2**30:.1f} "
            f"GiB (batch {sizes['batch']} x {len(heads)} heads x {len(rows)} rows x {keys} "
            f"keys x {itemsize} bytes); pass rows= (a few query rows) or fewer heads=")
    return heads, rows


def _indices(name: str, value, n: int, what: str) -> np.ndarray:
    if value is None:
        return np.arange(n)
    if isinstance(value, slice):
        return np.arange(n)[value]
    picked = np.atleast_1d(np.asarray(value.tolist() if hasattr(value, "tolist") else value))
    if picked.ndim != 1 or not picked.size or not np.issubdtype(picked.dtype, np.integer):
        raise InputError(f"{name}: expected a non-empty sequence of {what} in [0, {n}); got "
                         f"{value!r}")
    bad = picked[(picked < 0) | (picked >= n)]
    if bad.size:
        raise InputError(f"{name}: expected {what} in [0, {n}); got {bad[:4].tolist()}")
    return picked.astype(np.int64)
