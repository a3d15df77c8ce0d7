"""Tile layouts: the GQA head grouping, and the index environment of score_mod and mask.

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

__all__ = ["Layout", "merge_heads", "shared_kv", "split_heads"]


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
