"""[4] The block plan: for every (query block, key block) pair, FULL, PARTIAL or EMPTY (DESIGN §4).

``build_plan`` classifies all block pairs at once with the interval engine of
``attncc.analysis.intervals``: each block is a box of ``(q_idx, kv_idx)`` (and one ``b``, one ``h``
where the mask varies with them), and the mask is evaluated three-valued over the boxes, never
element by element. Inputs the mask reads (document ids) enter as their per-block min/max, found
in one O(elements) pass. Plans of index-only masks are cached per (spec hash, sizes, blocks).

Backends iterate the index tables: per query block the FULL key blocks (no elementwise mask
needed) and the PARTIAL ones (mask applied); EMPTY blocks cost nothing. The transposed tables
(per key block, its query blocks) serve backward passes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import sympy

from attncc.analysis.intervals import INT_LIMIT, block_range, classify_checked
from attncc.errors import InputError
from attncc.passes.masks import mask_dependencies
from attncc.spec import load_spec
from attncc.spec.symbols import SIZES

__all__ = ["EMPTY", "FULL", "PARTIAL", "BlockPlan", "build_plan"]

EMPTY, PARTIAL, FULL = 0, 1, 2
_AXES = {"b": 0, "h": 1, "q_idx": 2, "kv_idx": 3}


@dataclass(frozen=True, eq=False)
class BlockPlan:
    """Block states of one attention call.

    ``states`` is int8 ``(Bp, Hp, nQ, nK)`` of EMPTY/PARTIAL/FULL, read-only; ``Bp`` is 1 (the
    same for every batch element) or ``batch``, ``Hp`` likewise for query heads. ``seq_k`` counts
    the keys the mask sees (the linformer rank after projection; memory tokens are not in the
    plan). The last query/key block may be shorter than ``block_m``/``block_n``.

    Index tables are int32, as wide as the longest row (at least 1): row ``(b, h, m)`` of
    ``full_index`` starts with the key blocks that are FULL for query block ``m``, ascending, and
    ``full_counts[b, h, m]`` says how many; the entries after them are other valid block numbers
    (as in FlexAttention's BlockMask), safe to prefetch, never to use. The ``_t`` tables are the
    same per key block, listing query blocks.
    """

    seq_q: int
    seq_k: int
    block_m: int
    block_n: int
    states: np.ndarray

    @property
    def num_q_blocks(self) -> int:
        return self.states.shape[2]

    @property
    def num_kv_blocks(self) -> int:
        return self.states.shape[3]

    @cached_property
    def _full(self):
        return _index_table(self.states == FULL)

    @cached_property
    def _partial(self):
        return _index_table(self.states == PARTIAL)

    @cached_property
    def _full_t(self):
        return _index_table(np.swapaxes(self.states, 2, 3) == FULL)

    @cached_property
    def _partial_t(self):
        return _index_table(np.swapaxes(self.states, 2, 3) == PARTIAL)

    full_counts = property(lambda self: self._full[0], doc="(Bp, Hp, nQ) FULL key blocks per row")
    full_index = property(lambda self: self._full[1], doc="(Bp, Hp, nQ, max) FULL key blocks")
    partial_counts = property(lambda self: self._partial[0], doc="(Bp, Hp, nQ) PARTIAL per row")
    partial_index = property(lambda self: self._partial[1], doc="(Bp, Hp, nQ, max) PARTIAL")
    full_counts_t = property(lambda self: self._full_t[0], doc="(Bp, Hp, nK) FULL query blocks")
    full_index_t = property(lambda self: self._full_t[1], doc="(Bp, Hp, nK, max) FULL q blocks")
    partial_counts_t = property(lambda self: self._partial_t[0], doc="(Bp, Hp, nK) PARTIAL")
    partial_index_t = property(lambda self: self._partial_t[1], doc="(Bp, Hp, nK, max) PARTIAL")

    def kv_blocks(self, b: int, h: int, m: int) -> tuple[np.ndarray, np.ndarray]:
        """``(full, partial)`` key-block indices of query block ``m`` for batch ``b``, head ``h``
        (``b``/``h`` are ignored where the plan is shared across that axis)."""
        bb = 0 if self.states.shape[0] == 1 else b
        hh = 0 if self.states.shape[1] == 1 else h
        n_full, n_part = self.full_counts[bb, hh, m], self.partial_counts[bb, hh, m]
        return self.full_index[bb, hh, m, :n_full], self.partial_index[bb, hh, m, :n_part]

    def block_density(self) -> float:
        """Fraction of the ``seq_q x seq_k`` area (per batch and head) in non-EMPTY blocks."""
        rows = np.diff(np.minimum(np.arange(self.num_q_blocks + 1) * self.block_m, self.seq_q))
        cols = np.diff(np.minimum(np.arange(self.num_kv_blocks + 1) * self.block_n, self.seq_k))
        kept = (self.states != EMPTY).astype(np.float64)
        area = np.einsum("bhmn,m,n->", kept, rows.astype(np.float64), cols.astype(np.float64))
        return float(area / (kept.shape[0] * kept.shape[1] * self.seq_q * self.seq_k))

    def counts(self) -> dict[str, int]:
        """Number of FULL, PARTIAL and EMPTY blocks over the whole ``states`` array."""
        tally = np.bincount(self.states.ravel(), minlength=3)
        return {"FULL": int(tally[FULL]), "PARTIAL": int(tally[PARTIAL]),
                "EMPTY": int(tally[EMPTY])}

    def __repr__(self) -> str:
        c = self.counts()
        return (f"BlockPlan(seq_q={self.seq_q}, seq_k={self.seq_k}, block={self.block_m}x"
                f"{self.block_n}, states={tuple(self.states.shape)}, FULL={c['FULL']}, "
                f"PARTIAL={c['PARTIAL']}, EMPTY={c['EMPTY']}, "
                f"density={self.block_density():.3f})")


#: Block pairs one plan may hold (its states take a byte each, per batch/head slice kept).
MAX_BLOCK_PAIRS = 1 << 26


def build_plan(spec, sizes: dict, block_m: int, block_n: int,
               inputs: dict | None = None) -> BlockPlan:
    """The block plan of ``spec`` for the given ``sizes`` (size name -> int) and block sizes.

    ``sizes`` needs ``seq_q`` and ``seq_k``, plus ``batch``/``heads`` where the mask varies with
    ``b``/``h``, and any size the mask names. A mask that reads inputs needs them in ``inputs``
    (NumPy arrays or torch tensors); raises InputError when one is missing or malformed.
    """
    spec = load_spec(spec)
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise InputError(f"build_plan: {name} must be a positive integer, got {value!r}")
    sizes = {name: _size(name, value) for name, value in sizes.items()}
    for name in ("seq_q", "seq_k"):
        if name not in sizes:
            raise InputError(f"build_plan: sizes must give '{name}'; got {sorted(sizes)}")
    pairs = -(-sizes["seq_q"] // int(block_m)) * -(-sizes["seq_k"] // int(block_n))
    if pairs > MAX_BLOCK_PAIRS:
        raise InputError(f"build_plan: seq_q {sizes['seq_q']} x seq_k {sizes['seq_k']} in "
                         f"{block_m}x{block_n} blocks gives {pairs} block pairs; at most "
                         f"{MAX_BLOCK_PAIRS} are supported: use larger blocks")
    reads, _ = mask_dependencies(spec.mask)
    if reads:
        return _plan(spec, sizes, int(block_m), int(block_n), _arrays(reads, inputs))
    key = (spec.hash, tuple(sorted(sizes.items())), int(block_m), int(block_n))
    return _cached_plan(_Keyed(key, spec))


@dataclass(frozen=True)
class _Keyed:
    """A spec carried into the cache, compared by its key only."""

    key: tuple
    spec: object

    def __eq__(self, other) -> bool:
        return isinstance(other, _Keyed) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)


@functools.lru_cache(maxsize=64)
def _cached_plan(keyed: _Keyed) -> BlockPlan:
    _, sizes, block_m, block_n = keyed.key
    return _plan(keyed.spec, dict(sizes), block_m, block_n, {})


def _plan(spec, sizes: dict, block_m: int, block_n: int, arrays: dict) -> BlockPlan:
    seq_q = sizes["seq_q"]
    linformer = spec.lowrank is not None and spec.lowrank.method == "linformer"
    seq_k = spec.lowrank.size if linformer else sizes["seq_k"]
    n_q, n_k = -(-seq_q // block_m), -(-seq_k // block_n)
    if spec.mask is None:
        return _frozen(seq_q, seq_k, block_m, block_n, np.full((1, 1, n_q, n_k), FULL, np.int8))
    mask = spec.mask
    left = sorted(s.name for s in mask.free_symbols
                  if isinstance(s, sympy.Symbol) and s.name in SIZES and s.name not in sizes)
    if left:
        raise InputError(f"build_plan: the mask reads the size(s) {', '.join(left)}; pass them "
                         f"in sizes (got {sorted(sizes)})")
    _, varies = mask_dependencies(mask)
    extent = {"b": 1, "h": 1, "q_idx": seq_q, "kv_idx": seq_k}
    for axis, size_name in (("b", "batch"), ("h", "heads")):
        if axis in varies:
            if size_name not in sizes:
                raise InputError(f"build_plan: the mask varies with {axis}; sizes must give "
                                 f"'{size_name}'")
            extent[axis] = sizes[size_name]
    # sizes are point intervals, not substituted: sympy would decide some relations exactly
    # (q_idx == sigmoid(42) is False) where the elementwise float evaluation does not
    boxes = {name: (value, value) for name, value in sizes.items()}
    boxes.update({"b": _box(extent["b"], 1, extent["b"], 0),
                  "h": _box(extent["h"], 1, extent["h"], 1),
                  "q_idx": _box(seq_q, block_m, n_q, 2), "kv_idx": _box(seq_k, block_n, n_k, 3)})
    blocks = {"b": 1, "h": 1, "q_idx": block_m, "kv_idx": block_n}
    leaves = {e: _leaf(e, arrays[str(e.base.label)], extent, blocks)
              for e in mask.atoms(sympy.Indexed)}
    found = classify_checked(mask, boxes, leaves)
    shape = (extent["b"], extent["h"], n_q, n_k)
    states = np.array(np.broadcast_to(np.asarray(found.states, dtype=np.int8), shape))
    # blocks where integers may pass int64 are PARTIAL (never a wrong EMPTY/FULL); a kernel
    # evaluates the mask there, where int64 would wrap or fail: refuse the plan instead
    if found.overflow is not False and np.any(np.broadcast_to(found.overflow, shape)
                                              & (states == PARTIAL)):
        expr, reach = found.worst
        text = str(expr) if len(str(expr)) <= 80 else str(expr)[:77] + "..."
        raise InputError(f"build_plan: integer arithmetic in '{text}' reaches about {reach:.3g} "
                         f"in blocks where the mask must be evaluated, past the "
                         f"{INT_LIMIT:.3g} that 64-bit integers hold exactly")
    return _frozen(seq_q, seq_k, block_m, block_n, states)


def _frozen(seq_q, seq_k, block_m, block_n, states) -> BlockPlan:
    states.flags.writeable = False
    return BlockPlan(seq_q, seq_k, block_m, block_n, states)


def _box(length: int, block: int, count: int, axis: int):
    """``(lo, hi)`` of each block along ``axis`` of the 4-d layout, the last one clipped."""
    view = [1, 1, 1, 1]
    view[axis] = count
    lo = np.arange(count, dtype=np.int64) * block
    hi = np.minimum(lo + block, length) - 1
    return lo.reshape(view), hi.reshape(view)


def _leaf(e: sympy.Indexed, table: np.ndarray, extent: dict, blocks: dict):
    """Interval of input element ``e`` over every box: per-block min/max where each index is an
    index symbol or a constant, the input's global min/max otherwise (conservative)."""
    name = str(e.base.label)
    if table.ndim != len(e.indices):
        raise InputError(f"input '{name}': expected {len(e.indices)} dimension(s), got shape "
                         f"{table.shape}")
    if table.size == 0:
        raise InputError(f"input '{name}': expected a non-empty array, got shape {table.shape}")
    plain = [i.is_Integer or (i.is_Symbol and i.name in _AXES) for i in e.indices]
    symbols = [i.name for i in e.indices if i.is_Symbol]
    if not all(plain) or len(set(symbols)) != len(symbols):
        return _cast(table.min()), _cast(table.max())
    lo = hi = table
    layout = []
    for axis, index in enumerate(e.indices):
        size = table.shape[axis]
        if index.is_Integer:
            if not 0 <= int(index) < size:
                raise InputError(f"input '{name}' is indexed at {index} on its axis {axis} of "
                                 f"size {size}")
            lo, hi = np.take(lo, [int(index)], axis), np.take(hi, [int(index)], axis)
            layout.append(None)
            continue
        length = extent[index.name]
        if size < length:
            raise InputError(f"input '{name}': its axis {axis} is indexed by {index} up to "
                             f"{length - 1}, but has size {size}")
        lo = block_range(lo, axis, blocks[index.name], length)[0]
        hi = block_range(hi, axis, blocks[index.name], length)[1]
        layout.append(_AXES[index.name])
    return _to_layout(_cast(lo), layout), _to_layout(_cast(hi), layout)


def _to_layout(values: np.ndarray, layout: list) -> np.ndarray:
    """Move the input's axes to their place in the 4-d (b, h, q, kv) layout; ``None`` marks an
    axis taken at a constant (size 1, dropped)."""
    places = [p for p in layout if p is not None]
    values = values.reshape([n for n, p in zip(values.shape, layout, strict=True)
                             if p is not None])
    order = np.argsort(places)
    values = np.transpose(values, order)
    view = [1, 1, 1, 1]
    for k, i in enumerate(order):
        view[places[i]] = values.shape[k]
    return values.reshape(view)


def _cast(values):
    values = np.asarray(values)
    if np.issubdtype(values.dtype, np.floating):
        return values.astype(np.float64)
    return values.astype(np.int64) if values.ndim else int(values)


def _arrays(reads: tuple, inputs: dict | None) -> dict:
    missing = [n for n in reads if inputs is None or inputs.get(n) is None]
    if missing:
        raise InputError(f"build_plan: the mask reads the input(s) {', '.join(missing)}; pass "
                         f"them as inputs={{'{missing[0]}': array, ...}}")
    result = {}
    for name in reads:
        x = inputs[name]
        if hasattr(x, "detach"):
            x = x.detach().cpu().numpy()
        result[name] = np.asarray(x)
    return result


def _size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise InputError(f"build_plan: size '{name}' must be a positive integer, got {value!r}")
    return int(value)


def _index_table(selected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(counts, index)`` of the True entries along the last axis, in ascending order.

    A stable argsort of booleans is a linear-time radix sort in NumPy; it runs one (b, h) slice
    at a time so the int64 permutation stays one slice large.
    """
    counts = selected.sum(axis=-1, dtype=np.int32)
    width = max(1, int(counts.max(initial=0)))
    rows, cols = selected.shape[-2:]
    index = np.zeros((*selected.shape[:-1], width), dtype=np.int32)
    slices, out = selected.reshape(-1, rows, cols), index.reshape(-1, rows, width)
    for i in range(slices.shape[0]):
        out[i] = np.argsort(~slices[i], axis=-1, kind="stable")[:, :width]
    counts.flags.writeable = False
    index.flags.writeable = False
    return counts, index
