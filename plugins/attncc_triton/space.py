"""The Triton backend's tunables, next to the kernels they tune, with a keep() filter.

- ``block_m``, ``block_n``: query / key tile of the fused kernels (and of the block plan).
- ``num_warps``, ``num_stages``: Triton launch parameters (warps per program, software
  pipelining depth of the key-block loop).
- ``chunk``: positions per step of the linear-attention scan (linear specs only).

``keep`` drops, before anything is compiled, tiles that Triton cannot run (below 16, the smallest
``tl.dot``; ``block_n`` below the top-k K, which the threshold buffer needs), tiles whose shared
memory exceeds the target's, and tiles so register-hungry that every kernel would spill kilobytes.
The estimates are fitted to what ``triton.compile`` reports for sm_90 (``bench/triton_aot_sm90.py``,
``bench/results/triton_aot_sm90.md``) and assume 2-byte tensors (bfloat16/float16, what a GPU
runs): float32 and float64 kernels (FMA dots, ``input_precision="ieee"``) need 2-5x the shared
memory, which ``keep`` cannot see because a config is chosen before the dtype is known.
"""

from __future__ import annotations

from attncc.backends.base import SearchSpace

BLOCKS = (16, 32, 64, 128)
WARPS = (1, 2, 4, 8)
STAGES = (1, 2, 3, 4)


#: the most registers ptxas gives one thread on every NVIDIA GPU since Kepler
REGS_PER_THREAD = 255
#: shared memory Triton adds to the operand tiles (barriers, reduction scratch), bytes
SMEM_SLACK = 2048


def _pow2(n: int) -> int:
    return max(16, 1 << (max(1, int(n)) - 1).bit_length())


def estimate(config: dict, spec, head_dim: int, value_dim: int, elem_bytes: int = 2):
    """``(shared memory bytes, 32-bit register words per thread)`` of a fused config: the most
    any of its three kernels (forward, dq, dk/dv) needs.

    Shared memory holds the ``tl.dot`` operand tiles; the dk/dv kernel is the largest: q, do
    (``block_m`` rows) and k, v (``block_n`` rows) staged, plus the transposed probabilities
    (``block_m x block_n``). Measured on sm_90 in bf16 it is exact for ``num_stages=1`` and an
    upper bound (the software pipeliner shares buffers) for deeper pipelines. Registers: the
    dk/dv kernel's float32 accumulators (``block_n x (d + dv)``), its q and do tiles (2-byte, so
    half a word each) and four ``block_m x block_n`` float32 score tiles, spread over the threads;
    the additive score keeps a ``block_m x block_n x d`` tensor (twice, with its gradient), top-k
    a sort buffer of ``2 x block_m x block_n``."""
    bm, bn = config.get("block_m", 64), config.get("block_n", 64)
    d, dv = _pow2(head_dim), _pow2(value_dim)
    smem = elem_bytes * ((bm + bn) * (d + dv) + bm * bn) + SMEM_SLACK
    words = bn * (d + dv) + bm * (d + dv) * elem_bytes // 4 + 4 * bm * bn
    if spec.score == "additive":
        words += 2 * bm * bn * d
    if spec.normalize == "topk":
        words += 4 * bm * bn
    return smem, words // (32 * max(1, config.get("num_warps", 4)))


def search_space(spec, kind: str, target) -> SearchSpace:
    """The tunables for a lowering ``kind`` (fused, linear, nystrom) on ``target``."""
    smem_cap = getattr(target, "shared_memory_per_block", None) if target is not None else None
    reg_cap = getattr(target, "registers_per_block", None) if target is not None else None
    head_dim = spec.head_dim or 128
    value_dim = spec.value_dim or head_dim
    if kind == "linear":
        params = {"chunk": BLOCKS, "num_warps": WARPS, "num_stages": STAGES}
    else:
        params = {"block_m": BLOCKS, "block_n": BLOCKS, "num_warps": WARPS,
                  "num_stages": STAGES}
    topk = spec.topk or 1

    def keep(config: dict) -> bool:
        if kind == "linear":
            return True
        if config["block_n"] < topk:
            return False
        smem, regs = estimate(config, spec, head_dim, value_dim)
        if smem_cap is not None and smem > smem_cap:
            return False
        if reg_cap is None:
            return True
        per_thread = min(REGS_PER_THREAD, reg_cap // (32 * config["num_warps"]))
        # up to 2x the register file spills some (the tuner measures that); beyond, kilobytes
        return regs <= 2 * per_thread

    return SearchSpace(params, keep)


def default_config(spec, kind: str, target) -> dict:
    """An untuned config valid for the spec on the target (admitted by its ``keep``).

    On CUDA: 64 x 64 tiles with 8 warps, the sm_90 measurement's best untuned choice (no spills
    in the forward and dq kernels at d = 128; 4 warps spill in both backward kernels), halved
    while ``keep`` rejects it (the additive score's 3-D tensor, large top-k tiles)."""
    cuda = target is not None and getattr(target, "kind", "cpu") == "cuda"
    if kind == "linear":
        return {"chunk": 64 if cuda else 16, "num_warps": 4, "num_stages": 2}
    block_n = 64 if cuda else 16
    while block_n < (spec.topk or 1):
        block_n *= 2
    config = {"block_m": 64 if cuda else 16, "block_n": block_n, "num_warps": 8 if cuda else 4,
              "num_stages": 2 if cuda else 1}
    keep = search_space(spec, kind, target).keep
    while not keep(config) and config["block_m"] > BLOCKS[0]:
        config["block_m"] //= 2
    while not keep(config) and config["block_n"] // 2 >= max(BLOCKS[0], spec.topk or 1):
        config["block_n"] //= 2
    return config
