"""PyTorch backend: block-plan gathers and batched matmuls, CPU and CUDA, with autograd.

Registered as the ``torch`` entry point of ``attncc.backends``. ``compile`` turns a fused graph into
a ``TorchKernel`` that reads the graph's one attention node: FusedAttention -> fused SDPA calls
where its ``lowering`` allows them, else the flash pattern over the block plan (``flash.py``);
LinearAttention and Nystrom -> the shared recipes of ``attncc.lowering``.

Tunables (``search_space``, with a keep() filter, and ``default_config``) of the flash pattern
(softmax, sigmoid, top-k, Linformer):

- ``block_m``, ``block_n``: query / key block sizes of the block plan (finer blocks skip more
  EMPTY area of a sparse mask but run more, smaller matmuls).
- ``kv_chunk``: key blocks per inner iteration of the online softmax (wider = fewer, bigger
  matmuls, more memory per tile).
- ``group_blocks``: query blocks with equal key-block counts batched into one step.
- ``tile_elems``: cap on score elements per tile (bounds memory; a step is split to fit); one
  value.
- ``use_sdpa``: dispatch to torch's fused SDPA kernels, offered where the fused node's
  ``lowering`` (the ``strategy`` pass) allows the ``runs`` path: the whole call to
  ``torch.nn.functional.scaled_dot_product_attention`` where it also allows ``sdpa`` (plain
  dense or causal softmax); otherwise, on CPU without gradients, one CPU flash-attention call per
  run of key blocks of the plan (``runs.py``).

Linear attention: ``chunk``, the positions per chunk of the causal prefix-sum scan. Nyström has
no tunable.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from attncc.backends.base import SUPPORTED, Backend, SearchSpace, Support, lowered_node
from attncc.backends.config import full_config
from attncc.errors import AttnccError
from attncc.plan import EMPTY, build_plan

from .kernel import TorchKernel

__all__ = ["TorchBackend", "TorchKernel"]

BLOCKS = (16, 32, 64, 128, 256)
#: Score elements per tile (the memory bound of one step; 16 MiB in float32).
TILE_ELEMS = 1 << 22


class TorchBackend(Backend):
    """PyTorch kernels for every spec: float32/float16/bfloat16/float64 on CPU and CUDA."""

    name = "torch"
    version = "1"

    def supports(self, graph, target) -> Support:
        kind = getattr(target, "kind", "cpu") if target is not None else "cpu"
        if kind == "cuda" and not torch.cuda.is_available():
            return Support(False, "torch sees no CUDA device here; use a cpu target")
        if kind not in ("cpu", "cuda"):
            return Support(False, f"torch backend runs on cpu or cuda targets, not {kind!r}")
        lowered_node(graph, "torch", "flash")
        return SUPPORTED

    def search_space(self, graph, target) -> SearchSpace:
        """The tunables of the graph's attention node on ``target`` by its lowering kind (flash,
        linear, nystrom); ``node.lowering`` says which fused paths may serve it.

        ``keep`` admits the valid configs worth timing at the graph's ``sizes`` (``seq_q``/``seq_k``
        when known):

        - where the whole call is one SDPA call (dense, causal, decoding) only ``use_sdpa=True``
          is kept (a user may still ask for the tile loop): it is never faster there, and a
          record chosen by a noisy measurement must never replace the default with a slower
          path;
        - where a fused torch kernel runs (``use_sdpa``: SDPA whole for dense/causal specs, flex,
          the runs path of ``runs.py`` on CPU), the flash knobs are unused, so they must hold
          their defaults (and the blocks too under whole SDPA and flex): one config per distinct
          kernel. On CUDA a masked spec's ``use_sdpa`` would run the flash path anyway and is
          dropped for the same reason;
        - blocks no larger than the padded sequence; on the flash path, a key tile
          (``block_n * kv_chunk``) of at least 256 keys (or the whole padded sequence; narrower
          ones ran slower on CPU) and at most 2048 (wider ones only cost memory).
          ``tile_elems`` bounds memory and has one value; ``group_blocks`` 1 ran slower than 4
          and more and is not offered.
        """
        kind, node = lowered_node(graph, "torch", "flash")
        cuda = target is not None and getattr(target, "kind", "cpu") == "cuda"
        if kind == "linear":
            return SearchSpace({"chunk": (16, 32, 64, 128, 256)})
        if kind == "nystrom":
            return SearchSpace({})
        lowering = node.lowering
        # flex (a compiled FlexAttention forward) ignores every tile knob, like a whole SDPA call
        flex = lowering.allows("flex") and not lowering.allows("runs")
        eligible, whole = lowering.allows("runs") or flex, lowering.allows("sdpa")
        params = {"block_m": BLOCKS, "block_n": BLOCKS, "kv_chunk": (1, 2, 4, 8, 16, 32, 64),
                  "group_blocks": (4, 16, 64, 256), "tile_elems": (TILE_ELEMS,),
                  "use_sdpa": (True, False) if eligible and (whole or not cuda) else (False,)}
        base = self.default_config(graph, target)
        sizes = graph.graph.get("sizes") or {}
        padded_q, padded_k = (_padded(sizes.get(name)) for name in ("seq_q", "seq_k"))

        def keep(config: dict) -> bool:
            if not valid(lowering, config, target):
                return False
            if whole and not config.get("use_sdpa"):
                return False
            if config.get("use_sdpa") and (whole or flex):
                return all(config[name] == base[name]
                           for name in ("kv_chunk", "group_blocks", "block_m", "block_n"))
            if config["block_m"] > max(16, padded_q) or config["block_n"] > max(16, padded_k):
                return False
            if config.get("use_sdpa"):
                return not cuda and all(config[name] == base[name]
                                        for name in ("kv_chunk", "group_blocks"))
            width = config["block_n"] * config["kv_chunk"]
            return min(256, padded_k) <= width <= min(2048, max(padded_k, config["block_n"]))

        return SearchSpace(params, keep, lambda config: valid(lowering, config, target))

    def default_config(self, graph, target) -> dict:
        """An untuned config that is fast enough on CPU and valid everywhere."""
        kind, node = lowered_node(graph, "torch", "flash")
        if kind == "linear":
            return {"chunk": 64}
        if kind == "nystrom":
            return {}
        # 64-blocks for the fused runs path: a band then wastes 1/4 of a 256-window, not 1/2, and
        # the per-call overhead stays small (measured in bench/results/torch_cpu.md); 32 on CPU
        # where the mask keeps a narrow band of keys per query (``narrow_band``)
        runs = node.lowering.allows("runs")
        cpu = getattr(target, "kind", "cpu") == "cpu" if target is not None else True
        block = (32 if cpu and narrow_band(node) else 64) if runs else 128
        runs = runs or node.lowering.allows("flex")
        return {"block_m": block, "block_n": block, "kv_chunk": 16, "group_blocks": 64,
                "tile_elems": TILE_ELEMS, "use_sdpa": runs}

    def compile(self, graph, config, target) -> TorchKernel:
        full = full_config(self, graph, target, config,
                           why="use_sdpa needs a dot-product softmax spec; block_m * block_n * "
                               "kv_chunk must stay within tile_elems, at most 2**24 on CPU")
        kind, node = lowered_node(graph, "torch", "flash")
        return TorchKernel(graph, node, kind, full)

    def priority(self, target) -> int:
        return 20 if getattr(target, "kind", "cpu") == "cuda" else 10


def valid(lowering, config: dict, target) -> bool:
    """Whether ``compile`` can run ``config``: ``use_sdpa`` only where the node's ``lowering``
    allows the runs or flex path, and a tile within the memory cap. Looser than the tuner's ``keep``
    (below): a user may ask for any config that runs, however slow."""
    if config.get("use_sdpa") and not (lowering.allows("runs") or lowering.allows("flex")):
        return False
    cap = 1 << 26 if getattr(target, "kind", "cpu") == "cuda" else 1 << 24
    width = config["block_n"] * config["kv_chunk"]
    return (width <= 8192 and config["block_m"] * width <= config["tile_elems"]
            and config["tile_elems"] <= cap)


#: ``narrow_band`` probes the plan at this sequence length in blocks of this size.
PROBE_SEQ, PROBE_BLOCK = 1024, 16
#: Kept keys per query block (median) up to which 32-blocks serve the runs path better than 64.
NARROW = 64


@functools.lru_cache(maxsize=256)
def narrow_band(node) -> bool:
    """Whether most query blocks of ``node``'s plan keep at most ``NARROW`` keys, probed at
    ``PROBE_SEQ`` in ``PROBE_BLOCK``-blocks from the mask alone (index-only masks; a mask that
    reads inputs says no): there 32-blocks read half the keys a 64-block band reads, while
    wider windows lose more to smaller fused backward calls than they gain."""
    if node.mask is None:
        return False
    sizes = {"seq_q": PROBE_SEQ, "seq_k": PROBE_SEQ, "batch": 1, "heads": 1}
    try:
        plan = build_plan(node, sizes, PROBE_BLOCK, PROBE_BLOCK)
    except AttnccError:  # the mask reads inputs, or names a size the probe does not know
        return False
    kept = (plan.states != EMPTY).sum(-1)
    return float(np.median(kept)) * PROBE_BLOCK <= NARROW


def _padded(seq) -> int:
    """``seq`` rounded up to a power of two; a large number when unknown (no size limit)."""
    return 1 << (int(seq) - 1).bit_length() if seq else 1 << 30
