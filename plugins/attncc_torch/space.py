"""The torch backend's tunables, next to the kernel they tune, with a keep() filter.

Flash pattern (softmax, sigmoid, top-k, Linformer):

- ``block_m``, ``block_n``: query / key block sizes of the block plan (finer blocks skip more
  EMPTY area of a sparse mask but run more, smaller matmuls).
- ``kv_chunk``: key blocks per inner iteration of the online softmax (wider = fewer, bigger
  matmuls, more memory per tile).
- ``group_blocks``: query blocks with equal key-block counts batched into one step.
- ``tile_elems``: cap on score elements per tile (bounds memory; a step is split to fit).
- ``use_sdpa``: dispatch to torch's fused SDPA kernels: the whole call to
  ``torch.nn.functional.scaled_dot_product_attention`` where the spec is plain dense or causal
  softmax; otherwise, for a masked dot-product softmax on CPU without gradients, one CPU
  flash-attention call per run of key blocks of the plan (``runs.py``). keep() rejects it for
  other specs (score mods, sigmoid, top-k, memory tokens).

Linear attention: ``chunk``, the positions per chunk of the causal prefix-sum scan. Nyström has
no tunable.
"""

from __future__ import annotations

from attncc.backends.base import SearchSpace

BLOCKS = (16, 32, 64, 128, 256)


def sdpa_eligible(spec) -> bool:
    """True where torch SDPA computes exactly this spec (dense or causal dot-product softmax)."""
    heads_ok = spec.kv_heads is None or spec.kv_heads == spec.heads
    return (spec.score == "dot" and spec.score_mod is None and spec.normalize == "softmax"
            and spec.lowrank is None and not spec.memory_tokens and not spec.inputs
            and (spec.mask is None or spec.is_causal) and heads_ok)


def fused_eligible(spec) -> bool:
    """True where ``use_sdpa`` may be set: dot-product softmax with at most a mask (the runs
    path of ``runs.py``; plain dense or causal specs go to SDPA whole)."""
    return (spec.score == "dot" and spec.score_mod is None and spec.normalize == "softmax"
            and not spec.memory_tokens)


def search_space(spec, kind: str, target) -> SearchSpace:
    """The tunables for a lowering ``kind`` (flash, linear, nystrom) on ``target``."""
    cuda = target is not None and getattr(target, "kind", "cpu") == "cuda"
    if kind == "linear":
        return SearchSpace({"chunk": (16, 32, 64, 128, 256)})
    if kind == "nystrom":
        return SearchSpace({})
    params = {"block_m": BLOCKS, "block_n": BLOCKS, "kv_chunk": (1, 2, 4, 8, 16, 32, 64),
              "group_blocks": (1, 4, 16, 64, 256), "tile_elems": (1 << 20, 1 << 22, 1 << 24),
              "use_sdpa": (True, False) if fused_eligible(spec) else (False,)}
    eligible = fused_eligible(spec)
    cap = 1 << 26 if cuda else 1 << 24

    def keep(config: dict) -> bool:
        if config.get("use_sdpa") and not eligible:
            return False
        width = config["block_n"] * config["kv_chunk"]
        tile = config["block_m"] * width
        return width <= 8192 and tile <= config["tile_elems"] and config["tile_elems"] <= cap

    return SearchSpace(params, keep)


def default_config(spec, kind: str, target) -> dict:
    """An untuned config that is fast enough on CPU and valid everywhere."""
    if kind == "linear":
        return {"chunk": 64}
    if kind == "nystrom":
        return {}
    # 64-blocks for the fused runs path: a band then wastes 1/4 of a 256-window, not 1/2, and
    # the per-call overhead stays small (measured in bench/results/torch_cpu.md)
    block = 64 if fused_eligible(spec) else 128
    return {"block_m": block, "block_n": block, "kv_chunk": 16, "group_blocks": 64,
            "tile_elems": 1 << 22, "use_sdpa": fused_eligible(spec)}
