"""Linear-attention feature maps φ, their vector-Jacobian products, and the division rule.

Every function takes its namespace from its array argument (``array_api_compat``), so the same
code runs on NumPy arrays and on torch tensors (differentiable by torch autograd as written):

- ``elu1``: ``x + 1`` where ``x > 0``, else ``exp(x)`` (exact for very negative x, unlike
  ``elu(x) + 1``).
- ``relu``: ``max(x, 0)``; the vjp takes its derivative at 0 as 0 (torch autograd of
  ``maximum`` splits it there).
- ``performer`` (DESIGN §3): ``x' = x·head_dim^(-1/4)`` with head_dim the last axis of x,
  ``φ(x) = exp(x'·ωᵀ − ‖x'‖²/2) / √features`` for ``ω (features, head_dim)``.

Linear attention divides ``num = Σ_j φq_i·φk_j v_j`` by ``den = Σ_j φq_i·φk_j``; a zero
denominator (no kept key, or relu features all zero) gives 0, and no gradient reaches ``num``
there (``divide``, ``divide_vjp``).
"""

from __future__ import annotations

import math

from attncc.bind import namespace

__all__ = ["FEATURE_MAPS", "divide", "divide_vjp", "feature_map", "feature_map_vjp"]

FEATURE_MAPS = ("elu1", "relu", "performer")


def feature_map(kind: str, x, omega=None):
    """φ(x) over the last axis of ``x``; ``omega (features, head_dim)`` for performer only."""
    xp = namespace(x)
    if kind == "elu1":
        return xp.where(x > 0, x + 1, xp.exp(xp.minimum(x, 0.0)))
    if kind == "relu":
        return xp.maximum(x, 0.0)
    if kind != "performer":
        raise ValueError(f"unknown feature map {kind!r}; expected one of {FEATURE_MAPS}")
    xs, omega = _performer_inputs(xp, x, omega)
    projected = xs @ omega.mT
    norm = xp.sum(xs * xs, axis=-1, keepdims=True) / 2
    return xp.exp(projected - norm) / math.sqrt(omega.shape[0])


def feature_map_vjp(kind: str, x, omega, d_phi):
    """``(dx, d_omega)`` of ``φ = feature_map(kind, x, omega)`` for the gradient ``d_phi``.

    Computed in the dtype of ``d_phi`` (x and omega are cast to it); ``d_omega`` is None except
    for performer, where it sums over every leading axis of x.
    """
    xp = namespace(d_phi)
    x = xp.astype(x, d_phi.dtype, copy=False)
    if kind == "elu1":
        return d_phi * xp.where(x > 0, 1.0, xp.exp(xp.minimum(x, 0.0))), None
    if kind == "relu":
        return d_phi * xp.astype(x > 0, x.dtype), None
    xs, omega = _performer_inputs(xp, x, omega)
    scale = x.shape[-1] ** -0.25
    phi = xp.exp(xs @ omega.mT - xp.sum(xs * xs, axis=-1, keepdims=True) / 2)
    g = d_phi * phi / math.sqrt(omega.shape[0])
    d_xs = g @ omega - xs * xp.sum(g, axis=-1, keepdims=True)
    flat_g = xp.reshape(g, (-1, g.shape[-1]))
    flat_xs = xp.reshape(xs, (-1, xs.shape[-1]))
    return d_xs * scale, flat_g.mT @ flat_xs


def _performer_inputs(xp, x, omega):
    if omega is None:
        raise ValueError("the performer feature map needs omega (features, head_dim)")
    return x * x.shape[-1] ** -0.25, xp.astype(omega, x.dtype, copy=False)


def divide(num, den):
    """``num / den`` where ``den != 0``, else 0; ``den`` broadcasts against ``num``."""
    xp = namespace(num)
    empty = den == 0
    return xp.where(empty, 0.0, num / xp.where(empty, 1.0, den))


def divide_vjp(out, den, d_out):
    """``(d_num, d_den)`` of ``out = divide(num, den)``, den ``(..., rows)`` and out, d_out
    ``(..., rows, Dv)``, computed in den's dtype; both are 0 on rows where ``den`` is 0."""
    xp = namespace(den)
    empty = den == 0
    safe = xp.where(empty, 1.0, den)
    d_out = xp.astype(d_out, den.dtype, copy=False)
    d_num = xp.where(empty[..., None], 0.0, d_out / safe[..., None])
    dot = xp.sum(d_out * xp.astype(out, den.dtype, copy=False), axis=-1)
    return d_num, -xp.where(empty, 0.0, dot / safe)
