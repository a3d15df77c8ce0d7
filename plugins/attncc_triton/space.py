"""The Triton backend's tunables, next to the kernels they tune, with a keep() filter.

- ``block_m``, ``block_n``: query / key tile of the fused kernels (and of the block plan).
- ``num_warps``, ``num_stages``: Triton launch parameters (warps per program, software
  pipelining depth of the key-block loop).
- ``chunk``: positions per step of the linear-attention scan (linear specs only).

``valid`` (what ``compile`` accepts) drops tiles that cannot run: ``block_n`` below the top-k K,
which the threshold buffer needs, and tiles whose shared memory exceeds the target's (tiles are
never below 16, the smallest ``tl.dot``), linear chunks included. ``keep`` (what the tuner times)
also drops tiles so register-hungry that every kernel would spill kilobytes. The estimates
(``estimate``, ``linear_smem``) are fitted to what ``triton.compile`` reports for sm_90
(``bench/triton_aot_sm90.py``) and scale with the element size of the dtype the config must fit
(``graph.graph["dtype"]``; float32 when absent).
"""

from __future__ import annotations

from attncc.backends.base import SearchSpace
from attncc.errors import BackendError

from .runtime import pow2

BLOCKS = (16, 32, 64, 128)
WARPS = (1, 2, 4, 8)
STAGES = (1, 2, 3, 4)


#: the most registers ptxas gives one thread on every NVIDIA GPU since Kepler
REGS_PER_THREAD = 255
#: shared memory Triton adds to the operand tiles (barriers, reduction scratch), bytes
SMEM_SLACK = 2048


#: bytes per element of the dtypes a config can be asked to fit
ELEM_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def elem_bytes(dtype) -> int:
    """Bytes per element of ``dtype`` (a name such as ``"bfloat16"``, or a torch/NumPy dtype);
    4 (float32) for None, the ``Backend.search_space`` contract."""
    if dtype is None:
        return 4
    name = str(getattr(dtype, "name", dtype)).removeprefix("torch.")
    if name not in ELEM_BYTES:
        raise BackendError(f"triton backend: dtype must be one of {', '.join(ELEM_BYTES)}, got "
                           f"{dtype!r}")
    return ELEM_BYTES[name]


def estimate(config: dict, spec, head_dim: int, value_dim: int, elem_bytes: int = 2):
    """``(shared memory bytes, 32-bit register words per thread)`` of a fused config: the most
    any of its three kernels (forward, dq, dk/dv) needs, at ``elem_bytes`` per element.

    Both count the dk/dv kernel, the largest. Shared memory: its ``tl.dot`` operand tiles, q, do
    (``block_m`` rows), k, v (``block_n`` rows) and the transposed probabilities (``block_m x
    block_n``): exact on sm_90 in bf16 at ``num_stages=1``, an upper bound for deeper pipelines
    (the pipeliner shares buffers) and in float32, ~10% low in float64. Registers: its accumulators
    (``block_n x (d + dv)``, 2-word in float64), its q and do tiles and four ``block_m x block_n``
    score tiles in the accumulation type, spread over the threads; the additive score adds a
    ``block_m x block_n x d`` tensor (twice, with its gradient), top-k a sort buffer of
    ``2 x block_m x block_n``."""
    bm, bn = config.get("block_m", 64), config.get("block_n", 64)
    d, dv = pow2(head_dim), pow2(value_dim)
    smem = elem_bytes * ((bm + bn) * (d + dv) + bm * bn) + SMEM_SLACK
    acc_words = 2 if elem_bytes == 8 else 1
    acc = bn * (d + dv) + 4 * bm * bn
    if spec.score == "additive":
        acc += 2 * bm * bn * d
    if spec.normalize == "topk":
        acc += 4 * bm * bn
    words = acc * acc_words + bm * (d + dv) * elem_bytes // 4
    return smem, words // (32 * max(1, config.get("num_warps", 4)))


def linear_smem(config: dict, feats: int, value_dim: int, elem_bytes: int = 2) -> int:
    """Shared memory bytes of a linear config: an upper bound over its forward and backward scans.

    Counted in elements of ``elem_bytes``: the running state (``F x Dv``), four chunk tiles
    (φq, φk of ``chunk x F``; v, ∂L/∂num of ``chunk x Dv``: the backward stages all four) and
    the chunk's ``a`` / ``dA`` tile (``chunk x chunk``), F and Dv rounded up to powers of two."""
    c = config.get("chunk", 64)
    f, dv = pow2(feats), pow2(value_dim)
    return elem_bytes * (f * dv + c * (2 * f + 2 * dv) + c * c) + SMEM_SLACK


def search_space(spec, kind: str, target, dtype=None) -> SearchSpace:
    """The tunables for a lowering ``kind`` (fused, linear, nystrom) on ``target``, whose keep()
    judges shared memory and registers for ``dtype`` (float32 when None)."""
    size = elem_bytes(dtype)
    smem_cap = getattr(target, "shared_memory_per_block", None)
    reg_cap = getattr(target, "registers_per_block", None)
    head_dim = spec.head_dim or 128
    value_dim = spec.value_dim or head_dim
    params = {"chunk": BLOCKS} if kind == "linear" else {"block_m": BLOCKS, "block_n": BLOCKS}
    params.update(num_warps=WARPS, num_stages=STAGES)

    def valid(config: dict) -> bool:
        """Whether the config runs at all: the top-k buffer fits, shared memory fits."""
        if kind == "linear":
            smem = linear_smem(config, spec.features or head_dim, value_dim, size)
        elif config["block_n"] < (spec.topk or 1):
            return False
        else:
            smem, _ = estimate(config, spec, head_dim, value_dim, size)
        return smem_cap is None or smem <= smem_cap

    def keep(config: dict) -> bool:
        if kind == "linear" or reg_cap is None or not valid(config):
            return valid(config)
        _, regs = estimate(config, spec, head_dim, value_dim, size)
        per_thread = min(REGS_PER_THREAD, reg_cap // (32 * config["num_warps"]))
        # up to 2x the register file spills some (the tuner measures that); beyond, kilobytes
        return regs <= 2 * per_thread

    return SearchSpace(params, keep, valid)


def default_config(spec, kind: str, target, dtype=None) -> dict:
    """An untuned config for the spec on the target, admitted by its ``keep`` for ``dtype``
    (float32 when None) where a tile is, else the smallest one ``valid`` accepts (the additive
    score in float64 spills at every tile); BackendError where none runs.

    On CUDA: 64 x 64 tiles with 8 warps (the best untuned choice measured on sm_90), halved while
    ``keep`` rejects it (the additive score's 3-D tensor, large top-k tiles). Linear: chunk 64 on
    CUDA (16 on CPU), halved while its shared memory does not fit (float64)."""
    cuda = getattr(target, "kind", "cpu") == "cuda"
    topk = spec.topk or 1
    if kind == "linear":
        config = {"chunk": 64 if cuda else 16, "num_warps": 4, "num_stages": 2}
        least = {"chunk": BLOCKS[0]}
    else:
        block_n = 64 if cuda else 16
        while block_n < topk:
            block_n *= 2
        config = {"block_m": 64 if cuda else 16, "block_n": block_n,
                  "num_warps": 8 if cuda else 4, "num_stages": 2 if cuda else 1}
        least = {"block_m": BLOCKS[0], "block_n": max(BLOCKS[0], topk)}
    space = search_space(spec, kind, target, dtype)
    for name, smallest in least.items():
        while not space.keep(config) and config[name] // 2 >= smallest:
            config[name] //= 2
    if not space.accepts(config):
        raise BackendError(f"triton backend: no {dtype or 'float32'} "
                           f"{'chunk' if kind == 'linear' else 'tile'} of '{spec.name}' fits "
                           "the target's shared memory")
    return config
