"""[4] The block plan: for every (query block, key block) pair, FULL, PARTIAL or EMPTY (DESIGN §4).

The one block classifier. ``build_plan`` classifies all block pairs of a ``FusedAttention`` node
at once with the interval engine of ``attncc.analysis.intervals``: each block is a box of
``(q_idx, kv_idx)`` (and one ``b``, one ``h`` where the ``masks`` pass found that the mask varies
with them), and the mask is evaluated three-valued over the boxes, never element by element. An
input the mask reads enters as its min/max per box: each index expression's interval over the box
(``q_idx // 64`` as well as ``q_idx``), then the input's min/max over that index range
(``attncc.analysis.ranges``), O(elements + blocks log blocks); indexes the interval engine cannot
bound read the whole axis. Soundness: a block may be PARTIAL where it could be FULL or EMPTY,
never the reverse.

Caching: a Kernel holds one ``PlanCache`` per (node, blocks), which reuses a plan for equal sizes
and mask-input contents; index-only plans are also shared through one process-wide LRU cache.

Backends iterate the index tables: per query block the FULL key blocks (no elementwise mask
needed) and the PARTIAL ones (mask applied); EMPTY blocks cost nothing. The transposed tables
(per key block, its query blocks) serve backward passes.
"""

from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import sympy

from attncc.analysis.intervals import INT_LIMIT, classify_checked, interval
from attncc.analysis.ranges import range_bounds
from attncc.errors import InputError
from attncc.ir.graph import FusedAttention, Mask, Node, attention_node
from attncc.spec import load_spec
from attncc.spec.symbols import SIZES

__all__ = ["EMPTY", "FULL", "PARTIAL", "BlockPlan", "PlanCache", "build_plan", "fused_node"]

EMPTY, PARTIAL, FULL = 0, 1, 2
_AXES = {"b": 0, "h": 1, "q_idx": 2, "kv_idx": 3}


def _table(state: int, transposed: bool, part: int, doc: str) -> cached_property:
    """A BlockPlan attribute: the counts (``part`` 0) or index (1) of one ``_tables`` entry,
    kept on the plan after its first read (a plain attribute lookup on the hot path)."""
    def read(plan):
        return plan._tables(state, transposed)[part]

    read.__doc__ = doc
    return cached_property(read)


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

    def _tables(self, state: int, transposed: bool) -> tuple[np.ndarray, np.ndarray]:
        """``_index_table`` of the blocks in ``state``, per query block (or per key block when
        ``transposed``); built on first use, then kept with the plan."""
        tables = self.__dict__.setdefault("_index_tables", {})
        if (state, transposed) not in tables:
            states = np.swapaxes(self.states, 2, 3) if transposed else self.states
            tables[state, transposed] = _index_table(states == state)
        return tables[state, transposed]

    full_counts = _table(FULL, False, 0, "(Bp, Hp, nQ) FULL key blocks per row")
    full_index = _table(FULL, False, 1, "(Bp, Hp, nQ, max) FULL key blocks")
    partial_counts = _table(PARTIAL, False, 0, "(Bp, Hp, nQ) PARTIAL key blocks per row")
    partial_index = _table(PARTIAL, False, 1, "(Bp, Hp, nQ, max) PARTIAL key blocks")
    full_counts_t = _table(FULL, True, 0, "(Bp, Hp, nK) FULL query blocks per key block")
    full_index_t = _table(FULL, True, 1, "(Bp, Hp, nK, max) FULL query blocks")
    partial_counts_t = _table(PARTIAL, True, 0, "(Bp, Hp, nK) PARTIAL query blocks per key block")
    partial_index_t = _table(PARTIAL, True, 1, "(Bp, Hp, nK, max) PARTIAL query blocks")

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
#: Bytes of mask inputs up to which a PlanCache keys plans by their content.
CONTENT_CAP = 1 << 22
_SMALL = 1 << 16


def build_plan(source, sizes: dict, block_m: int, block_n: int,
               inputs: dict | None = None) -> BlockPlan:
    """The block plan of ``source`` for the given ``sizes`` (size name -> int) and block sizes.

    ``source`` is a FusedAttention node (after the ``masks`` pass), or anything ``load_spec``
    takes, lowered through the pipeline (cached per spec). ``sizes`` needs ``seq_q`` and
    ``seq_k`` (not under a Linformer projection, whose rank is the key count), plus
    ``batch``/``heads`` where the mask varies with ``b``/``h``, and any size the mask names. A
    mask that reads inputs needs them in ``inputs`` (NumPy arrays or torch tensors). Raises
    InputError when one is missing or malformed, or when the source has no block plan.
    Index-only plans are cached process-wide; others are built afresh (a PlanCache keys them by
    content).
    """
    return _planner(fused_node(source), block_m, block_n).get(sizes, inputs)


def fused_node(source) -> FusedAttention:
    """The FusedAttention node a plan is built from: ``source`` itself, or a spec's, lowered
    through the pipeline (cached per spec). InputError for a node or spec without one."""
    node = source if isinstance(source, Node) else _lowered(load_spec(source))
    if not isinstance(node, FusedAttention):
        raise InputError(f"build_plan: a {node.op_name} node has no block plan (only "
                         f"FusedAttention, the flash pattern, has one)")
    return node


@functools.lru_cache(maxsize=64)
def _planner(node: FusedAttention, block_m: int, block_n: int) -> PlanCache:
    """``build_plan``'s PlanCache of ``node`` in these blocks, one per (node, blocks); it keeps
    no plans (index-only ones are shared through ``_cached_plan``)."""
    return PlanCache(node, block_m, block_n, size=0)


@functools.lru_cache(maxsize=64)
def _lowered(spec) -> Node:
    from attncc.passes.pipeline import lower  # the pipeline is above the plan

    return attention_node(lower(spec))[1]


class PlanCache:
    """The plans of one FusedAttention node in ``block_m x block_n`` blocks, most recent first.

    ``get(sizes, inputs)`` returns the plan for ``sizes`` (only the sizes the plan depends on
    count) and, where the mask reads inputs, their dtype, shape and a digest of their bytes:
    equal inputs reuse their plan, a changed one never does; inputs past ``CONTENT_CAP`` bytes
    in all are not cached. Holds up to ``size`` plans (LRU). A hit costs a tuple and a dict
    lookup for an index-only mask. Raises what ``build_plan`` raises.
    """

    def __init__(self, node, block_m: int, block_n: int, size: int = 16):
        self.node = fused_node(node)
        self.block_m = _positive("block_m", block_m)
        self.block_n = _positive("block_n", block_n)
        self.size = size
        mask = self.node.mask or Mask(sympy.true)  # none: reads and varies with nothing
        self.reads = mask.reads_inputs
        named = sorted(s.name for s in mask.expr.free_symbols
                       if isinstance(s, sympy.Symbol) and s.name in SIZES)
        needed = ["seq_q"] + (["seq_k"] if self.node.projection is None else [])
        needed += [n for a, n in (("b", "batch"), ("h", "heads")) if a in mask.varies_with]
        self.names = tuple(dict.fromkeys(needed + named))
        self._plans: OrderedDict = OrderedDict()

    def get(self, sizes: dict, inputs: dict | None = None) -> BlockPlan:
        """The plan at ``sizes`` (and ``inputs``, where the mask reads them); see the class."""
        try:
            key = tuple([sizes[name] for name in self.names])
        except KeyError:
            key = None  # _build names what is missing
        arrays = None
        if self.reads and key is not None:
            arrays = _arrays(self.reads, inputs)
            content = _content(arrays) if self.size else None
            key = key + content if content is not None else None
        plan = self._plans.get(key) if key is not None else None
        if plan is not None:
            self._plans.move_to_end(key)
            return plan
        plan = self._build(sizes, inputs, arrays)
        if key is not None and self.size:
            self._plans[key] = plan
            if len(self._plans) > self.size:
                self._plans.popitem(last=False)
        return plan

    def _build(self, sizes: dict, inputs, arrays) -> BlockPlan:
        needed = {}
        for name in self.names:
            if name not in sizes:
                raise InputError(f"build_plan: sizes must give '{name}' (the plan depends on "
                                 f"it); got {sorted(sizes)}")
            needed[name] = _positive(f"size '{name}'", sizes[name])
        bm, bn = self.block_m, self.block_n
        seq_k = self.node.projection or needed["seq_k"]
        pairs = -(-needed["seq_q"] // bm) * -(-seq_k // bn)
        if pairs > MAX_BLOCK_PAIRS:
            raise InputError(f"build_plan: seq_q {needed['seq_q']} x seq_k {seq_k} in {bm}x{bn} "
                             f"blocks gives {pairs} block pairs; at most {MAX_BLOCK_PAIRS} are "
                             f"supported: use larger blocks")
        if self.reads:
            arrays = arrays if arrays is not None else _arrays(self.reads, inputs)
            return _classify(self.node, needed, bm, bn, arrays)
        return _cached_plan(self.node, tuple(needed.items()), bm, bn)


@functools.lru_cache(maxsize=64)
def _cached_plan(node: FusedAttention, sizes: tuple, block_m: int, block_n: int) -> BlockPlan:
    """The shared plans of index-only masks (equal nodes compare equal by their fields)."""
    return _classify(node, dict(sizes), block_m, block_n, {})


def _classify(node: FusedAttention, sizes: dict, block_m: int, block_n: int,
              arrays: dict) -> BlockPlan:
    seq_q = sizes["seq_q"]
    seq_k = node.projection or sizes["seq_k"]
    n_q, n_k = -(-seq_q // block_m), -(-seq_k // block_n)
    if node.mask is None:
        return _frozen(seq_q, seq_k, block_m, block_n, np.full((1, 1, n_q, n_k), FULL, np.int8))
    mask = node.mask.expr
    extent = {"b": 1, "h": 1, "q_idx": seq_q, "kv_idx": seq_k}
    for axis, size_name in (("b", "batch"), ("h", "heads")):
        if axis in node.mask.varies_with:
            extent[axis] = sizes[size_name]
    # sizes are point intervals, not substituted: sympy would decide some relations exactly
    # (q_idx == sigmoid(42) is False) where the elementwise float evaluation does not
    boxes = {name: (value, value) for name, value in sizes.items()}
    blocks = {"b": 1, "h": 1, "q_idx": block_m, "kv_idx": block_n}
    boxes.update({name: _box(extent[name], blocks[name], axis) for name, axis in _AXES.items()})
    leaves: dict = {}
    for e in sorted(mask.atoms(sympy.Indexed), key=lambda e: len(str(e))):  # inner first
        leaves[e] = _leaf(e, arrays[str(e.base.label)], extent, boxes, leaves)
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


def _box(length: int, block: int, axis: int):
    """``(lo, hi)`` of each block along ``axis`` of the 4-d layout, the last one clipped."""
    count = -(-length // block)
    view = [1, 1, 1, 1]
    view[axis] = count
    lo = np.arange(count, dtype=np.int64) * block
    hi = np.minimum(lo + block, length) - 1
    return lo.reshape(view), hi.reshape(view)


def _leaf(e: sympy.Indexed, table: np.ndarray, extent: dict, boxes: dict, leaves: dict):
    """Interval of input element ``e`` over every box: the input's min/max over the range of
    each index's interval; the whole axis where an index is not an integer; NaN (undecided:
    the box is PARTIAL, so the kernel's evaluation checks the index) where one may leave its
    axis."""
    name = str(e.base.label)
    if table.ndim != len(e.indices):
        raise InputError(f"input '{name}': expected {len(e.indices)} dimension(s), got shape "
                         f"{table.shape}")
    if table.size == 0:
        raise InputError(f"input '{name}': expected a non-empty array, got shape {table.shape}")
    ranges, leave = [], False
    for axis, index in enumerate(e.indices):
        size = table.shape[axis]
        if index.is_Integer and not 0 <= int(index) < size:
            raise InputError(f"input '{name}' is indexed at {index} on its axis {axis} of "
                             f"size {size}")
        if index.is_Symbol and index.name in _AXES and size < extent[index.name]:
            raise InputError(f"input '{name}': its axis {axis} is indexed by {index} up to "
                             f"{extent[index.name] - 1}, but has size {size}")
        lo, hi = interval(index, boxes, leaves)
        if not all(np.issubdtype(np.asarray(x).dtype, np.integer) for x in (lo, hi)):
            lo, hi = 0, size - 1
        outside = (np.asarray(lo) < 0) | (np.asarray(hi) > size - 1)
        leave = leave | outside
        ranges.append((np.where(outside, 0, lo), np.where(outside, size - 1, hi)))
    lo, hi = range_bounds(table, ranges)
    if np.any(leave):  # undecided there (NaN bounds): the kernel evaluates, and checks, it
        lo, hi = (np.where(leave, np.nan, np.asarray(x, dtype=np.float64)) for x in (lo, hi))
    return _cast(lo), _cast(hi)


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
    return {name: host_array(inputs[name]) for name in reads}


def host_array(x, keep_float16: bool = False) -> np.ndarray:
    """An array or tensor as a host NumPy array: a torch tensor detached and moved to the CPU,
    its bfloat16 (which NumPy lacks) as float32, its float16 as float32 too (the dtype the
    kernels evaluate inputs in) unless ``keep_float16``."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        half = x.dtype.is_floating_point and x.dtype.itemsize < 4
        if half and not (keep_float16 and str(x.dtype) == "torch.float16"):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _content(arrays: dict) -> tuple | None:
    """Cache key of the inputs' values: (name, dtype, shape, digest) each; None past the cap.
    The digest is the bytes up to ``_SMALL`` of them (faster than hashing), else their SHA-1
    read in place (no large copy made or kept); a boolean array's are its packed bits."""
    if sum(x.nbytes for x in arrays.values()) > CONTENT_CAP:
        return None
    key = []
    for name, x in arrays.items():
        data = np.packbits(x) if x.dtype == np.bool_ else np.ascontiguousarray(x)
        digest = (data.tobytes() if data.nbytes <= _SMALL else
                  hashlib.sha1(data.view(np.uint8), usedforsecurity=False).digest())
        key.append((name, x.dtype.str, x.shape, digest))
    return tuple(key)


def _positive(what: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise InputError(f"build_plan: {what} must be a positive integer, got {value!r}")
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
