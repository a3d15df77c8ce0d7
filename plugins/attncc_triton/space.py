"""The Triton backend's tunables, next to the kernels they tune, with a keep() filter.

- ``block_m``, ``block_n``: query / key tile of the fused kernels (and of the block plan).
- ``num_warps``, ``num_stages``: Triton launch parameters (warps per program, software
  pipelining depth of the key-block loop).
- ``chunk``: positions per step of the linear-attention scan (linear specs only).

``keep`` drops, before anything is compiled, tiles that Triton cannot run (below 16, the smallest
``tl.dot``; ``block_n`` below the top-k K, which the threshold buffer needs) and tiles whose
estimated shared memory or registers exceed the target's (when the target states them).
"""

from __future__ import annotations

from attncc.backends.base import SearchSpace

BLOCKS = (16, 32, 64, 128)
WARPS = (1, 2, 4, 8)
STAGES = (1, 2, 3, 4)


def _pow2(n: int) -> int:
    return max(16, 1 << (max(1, int(n)) - 1).bit_length())


def estimate(config: dict, spec, head_dim: int, value_dim: int, elem_bytes: int = 2):
    """``(shared memory bytes, registers per program)`` of a fused config, roughly: the k, v
    tiles staged ``num_stages`` deep in shared memory, q and the accumulators in registers."""
    bm, bn = config.get("block_m", 64), config.get("block_n", 64)
    d, dv = _pow2(head_dim), _pow2(value_dim)
    stages = max(1, config.get("num_stages", 2))
    smem = stages * bn * (d + dv) * elem_bytes + bm * d * elem_bytes
    regs = bm * (d + dv) + bm * bn * 2
    if spec.score == "additive":
        regs += bm * bn * d
    if spec.normalize == "topk":
        regs += bm * bn * 4
    return smem, regs


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
        # a program gets at most registers_per_block 32-bit registers across its warps
        return reg_cap is None or regs <= reg_cap * 0.75

    return SearchSpace(params, keep)


def default_config(spec, kind: str, target) -> dict:
    """An untuned config valid for the spec on the target."""
    cuda = target is not None and getattr(target, "kind", "cpu") == "cuda"
    if kind == "linear":
        return {"chunk": 64 if cuda else 16, "num_warps": 4, "num_stages": 2}
    block_n = 64 if cuda else 16
    while block_n < (spec.topk or 1):
        block_n *= 2
    return {"block_m": 64 if cuda else 16, "block_n": block_n, "num_warps": 4,
            "num_stages": 2 if cuda else 1}
