"""Tile layouts: the GQA head grouping, raw scores, and the index environment of score_mod and mask.

GQA: query heads ``(B, H, N, D)`` are viewed ``(B, Hkv, G, N, D)`` (``split_heads``, G = H / Hkv,
query head ``h`` is kv head ``h // G``) and keys/values ``(B, Hkv, 1, N, D)`` (``shared_kv``), so
products broadcast over the group axis and K/V are never copied per query head.

A backend evaluates ``score_mod`` and ``mask`` (``attncc.spec.numeric.evaluate``) on a tile of
its own layout: ``Layout`` says which axes of the ``ndim``-D tile hold the batch entry ``b``, the
query head ``h``, the query position ``q_idx`` and the key position ``kv_idx``; the backend gives
each index as an integer array with one axis per listed tile axis (in order), and ``Layout``
reshapes it (``.reshape``, a method of NumPy arrays and torch tensors alike) to broadcast
against the tile (size 1 on every other axis). So ``slope[h]`` or
``doc[b, q_idx]`` index the inputs exactly as the reference does. The expression environment is
the sizes and inputs by name plus the four index arrays (and ``score`` for score_mod).
"""

from __future__ import annotations

from dataclasses import dataclass

from attncc.bind import namespace
from attncc.spec.numeric import evaluate

__all__ = ["SCORE_TEXT", "Layout", "Slice", "block_scores", "merge_heads", "plan_slices",
           "raw_scores", "shared_kv", "split_heads"]

#: score kind -> the pseudo-code of ``raw_scores`` (``kernel.source``; fill in scale, q, k)
SCORE_TEXT = {"dot": "({scale} * {q}) @ {k}.T",
              "additive": "sum(w[h, :] * tanh({q}[:, None, :] + {k}[None, :, :]), axis=-1)"}


def split_heads(q, kv_heads: int):
    """``(B, H, N, D)`` -> the view ``(B, Hkv, G, N, D)``."""
    batch, heads, n, d = q.shape
    return q.reshape((batch, kv_heads, heads // kv_heads, n, d))


def shared_kv(x):
    """``(B, Hkv, N, D)`` -> the view ``(B, Hkv, 1, N, D)``, broadcast over the group."""
    return x[:, :, None]


def merge_heads(x):
    """The inverse of ``split_heads``: ``(B, Hkv, G, N, D)`` -> ``(B, H, N, D)``."""
    batch, kv_heads, group, n, d = x.shape
    return x.reshape((batch, kv_heads * group, n, d))


def raw_scores(q, k, scale, w=None, matmul=None):
    """Scores before score_mod ``(..., R, C)``, a fresh array, of q ``(..., R, D)`` against
    k ``(..., C, D)`` (broadcast): dot ``(scale·q)·kᵀ``, or additive (``w`` given, broadcast
    as ``(..., 1, 1, D)``) ``Σ_d w_d·tanh(q_d + k_d)``. ``matmul(q, kᵀ)``, where given, is the
    dot's product (the torch kernel's half types: half operands, a float32 result), the scale
    applied to its result."""
    if w is None:
        return (q * scale) @ k.mT if matmul is None else matmul(q, k.mT) * scale
    xp = namespace(q)
    return xp.sum(xp.tanh(q[..., :, None, :] + k[..., None, :, :]) * w, axis=-1)


def block_scores(node, q, k, scale, w, blocks, block_n: int, env, xp=None):
    """``(start, stop, s, keep)`` per key block ``(n, full)`` of ``blocks``: the scores of ``q``
    against keys ``start:stop`` of ``k`` after score_mod (a fresh array unless there is one)
    and, on a PARTIAL block, the mask (None on a FULL one). ``env(start, stop)``: the tile's
    index environment (``Layout``), asked for only where score_mod or mask reads it; ``xp``:
    the namespace to evaluate in (default ``q``'s; NumPy passes ``numpy``, faster)."""
    xp = xp or namespace(q)
    for n, full in blocks:
        start, stop = n * block_n, min((n + 1) * block_n, k.shape[-2])
        s = raw_scores(q, k[..., start:stop, :], scale, w)
        tile_env = env(start, stop) if node.score_mod is not None or not full else None
        if node.score_mod is not None:
            value = evaluate(node.score_mod, {**tile_env, "score": s}, xp)
            s = (xp.full_like(s, value) if isinstance(value, int | float)  # a constant
                 else xp.broadcast_to(xp.asarray(value, dtype=s.dtype), s.shape))
        keep = None
        if not full:
            keep = xp.broadcast_to(xp.asarray(evaluate(node.mask.expr, tile_env, xp)), s.shape)
        yield start, stop, s, keep


@dataclass(frozen=True)
class Slice:
    """The (batch, head) pairs that share slice ``(bp, hp)`` of a block plan's states: batch
    entries ``b0:b0+nb``, kv heads ``h0:h0+nh`` and, in each kv head's group, query heads
    ``g0:g0+ng`` (every pair where the plan is shared, Bp = Hp = 1; one batch entry where the
    mask reads ``b``, one query head where it reads ``h``)."""

    b0: int
    nb: int
    h0: int
    nh: int
    g0: int
    ng: int
    bp: int
    hp: int

    @property
    def index(self) -> tuple[slice, slice, slice]:
        """The slice's part of an array laid out ``(B, Hkv, G, ...)``."""
        return (slice(self.b0, self.b0 + self.nb), slice(self.h0, self.h0 + self.nh),
                slice(self.g0, self.g0 + self.ng))

    def indices(self, xp, group: int, device=None):
        """``(b (nb,), h (nh, ng))``: its batch entries and global query head numbers."""
        b, h, g = (xp.arange(i.start, i.stop, device=device) for i in self.index)
        return b, h[:, None] * group + g


def plan_slices(plan, batch: int, kv_heads: int, group: int) -> list[Slice]:
    """Every ``Slice`` of ``plan`` (its states are ``(Bp, Hp, ...)``, Hp over query heads)."""
    bps, hps = plan.states.shape[:2]
    bs = [(0, batch, 0)] if bps == 1 else [(b, 1, b) for b in range(batch)]
    hs = ([(0, kv_heads, 0, group, 0)] if hps == 1
          else [(h // group, 1, h % group, 1, h) for h in range(kv_heads * group)])
    return [Slice(b0, nb, h0, nh, g0, ng, bp, hp)
            for b0, nb, bp in bs for h0, nh, g0, ng, hp in hs]


@dataclass(frozen=True)
class Layout:
    """Where the four indices sit in an ``ndim``-D tile: a tuple of tile axes each, ascending.

    For example the numpy backend's ``(B', Hkv', G', rows, cols)`` tiles are
    ``Layout(5, b=(0,), h=(1, 2), q_idx=(3,), kv_idx=(4,))``, ``h`` given as the global query
    head numbers ``(Hkv', G')``.
    """

    ndim: int
    b: tuple[int, ...]
    h: tuple[int, ...]
    q_idx: tuple[int, ...]
    kv_idx: tuple[int, ...]

    def place(self, name: str, values):
        """``values`` (one axis per tile axis of index ``name``) shaped to broadcast against
        the tile."""
        axes = getattr(self, name)
        if len(values.shape) != len(axes):
            raise ValueError(f"{name}: expected {len(axes)} axes for tile axes {axes}, got "
                             f"shape {tuple(values.shape)}")
        shape = [1] * self.ndim
        for axis, n in zip(axes, values.shape, strict=True):
            shape[axis] = n
        return values.reshape(tuple(shape))

    def fixed(self, sizes: dict, inputs: dict, b, h) -> dict:
        """The part of the environment shared by a slice's tiles: sizes, inputs, ``b`` and
        ``h`` (built once per slice, not per tile)."""
        return {**sizes, **inputs, "b": self.place("b", b), "h": self.place("h", h)}

    def env(self, fixed: dict, q_idx, kv_idx) -> dict:
        """A tile's environment: ``fixed`` plus its query and key positions."""
        return {**fixed, "q_idx": self.place("q_idx", q_idx),
                "kv_idx": self.place("kv_idx", kv_idx)}
