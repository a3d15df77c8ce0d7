"""The backend plugin interface: a tiny ABC, and the Kernel it compiles to.

A backend is registered under the entry-point group ``attncc.backends`` (see ``registry``). It says
whether it can run a graph on a target (``supports``), what it can tune (``search_space``), its
untuned choice (``default_config``), and compiles a graph with a config into a ``Kernel``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from attncc.errors import BackendError
from attncc.ir.graph import LinearAttention, Nystrom, attention_node


@dataclass(frozen=True)
class Support:
    """``ok``, or not with a ``reason`` a user can act on."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


SUPPORTED = Support(True)


def lowered_node(graph, backend: str, fused: str) -> tuple[str, Any]:
    """``(kind, node)``: the graph's attention node (``attncc.ir.graph.attention_node``) and its
    kind, ``"linear"``, ``"nystrom"`` or, for a FusedAttention, ``fused`` (the backend's word);
    BackendError ``"<backend> backend: <why>"`` where the graph has no attention node."""
    try:
        _, node = attention_node(graph)
    except ValueError as err:
        raise BackendError(f"{backend} backend: {err}") from None
    return {LinearAttention: "linear", Nystrom: "nystrom"}.get(type(node), fused), node


@dataclass(frozen=True)
class SearchSpace:
    """Tunables: name -> the values it may take, and ``keep(config)`` that drops the configs not
    worth timing (those that cannot run, and any a backend knows to be slow or redundant).

    ``configs()`` enumerates the whole grid after ``keep``. ``valid(config)``, when given, is the
    looser test of whether a config runs at all: ``attncc.compile`` accepts a config the caller
    passes when ``accepts`` it, so a user may pick a config the tuner would never try.
    """

    params: dict[str, tuple]
    keep: Callable[[dict], bool] = field(default=lambda config: True)
    valid: Callable[[dict], bool] | None = None

    def accepts(self, config: dict) -> bool:
        """Whether ``config`` (every tunable set) can run: ``valid``, else ``keep``."""
        return bool((self.valid or self.keep)(config))

    def configs(self) -> list[dict]:
        grid = [{}]
        for name, values in self.params.items():
            grid = [{**config, name: value} for config in grid for value in values]
        return [config for config in grid if self.keep(config)]


class Kernel(ABC):
    """A compiled attention kernel: ``kernel(q, k, v, return_lse=False, **inputs)``.

    Everything attncc's core reads from a kernel is declared here:

    - ``backend``: the name of the backend that compiled it; ``spec``: the Spec it runs;
    - ``config``: the tile parameters it was compiled with (every tunable set);
    - ``source``: the generated code, or a readable description of what runs, generated from the
      same IR node the kernel runs;
    - ``backward``: ``backward(q, k, v, grad_out, **inputs) -> {"q", "k", "v", floating input
      name: gradient}`` where the backend supports gradients, else None;
    - ``record``: the tuning record its config came from (None for defaults) and ``selection``:
      in words, which backend and config ``attncc.compile`` chose and why (both set by
      ``attncc.compile``);
    - ``node``: the attention node it computes (``attncc.ir.graph``), read by ``attention_map``
      and ``stats=``; None: lowered from ``spec`` when needed.

    ``kernel(q, k, v, stats=(names...), **inputs)`` returns ``(out, {name: (B, H, Nq)})``, the
    per-row statistics of ``attncc.lowering.maps`` (``(out, lse, stats)`` with ``return_lse``);
    a kernel may serve ``stats=`` by ``return self.call_with_stats(...)``.
    """

    backend: str
    spec: Any
    config: dict
    source: str
    backward: Callable | None = None
    record: Any = None
    selection: str = ""
    node: Any = None

    @abstractmethod
    def __call__(self, q, k, v, *, return_lse: bool = False, **inputs):
        """Output ``(B, Hq, Nq, Dv)``; with ``return_lse``, ``(out, lse)``, lse ``(B, Hq, Nq)``."""

    def attention_map(self, q, k, v, *, heads=None, rows=None, **inputs):
        """The exact attention weights ``(B, len(heads), len(rows), memory_tokens + seq_k)``
        (memory tokens first) of the selected query ``heads`` and ``rows`` (None: all; a
        sequence, a range or a slice), in the compute dtype, as ``attncc.reference.attention_map``
        defines them. Default: from this kernel's own lse (``return_lse=True``) and one pass
        over the visited blocks of the plan for those rows only (``attncc.lowering.maps``);
        InputError when heads or rows are out of range or the map would exceed 2 GiB."""
        from attncc.lowering.maps import kernel_map

        return kernel_map(self, q, k, v, heads, rows, inputs)

    def call_with_stats(self, q, k, v, stats, return_lse: bool, inputs: dict):
        """``__call__`` with ``stats=``: the output (and lse) from one call of this kernel,
        then the statistics in one more pass over the visited blocks (``attncc.lowering.maps``:
        which normalisation defines which; InputError for the others)."""
        from attncc.lowering.maps import kernel_stats

        return kernel_stats(self, q, k, v, stats, return_lse, inputs)

    def companions(self) -> dict[str, str]:
        """Files ``source`` needs beside it when exported (``attncc compile -o DIR``): file
        name -> text, e.g. a host runtime the generated module imports; {} by default."""
        return {}

    def torch_op(self) -> Callable | None:
        """A function ``fn(q, k, v, **inputs) -> out`` that only calls ``torch.library``
        operators of this kernel (registered with fake and autograd implementations), so that
        ``torch.compile(fullgraph=True)`` keeps it in one graph; or None, in which case
        ``attncc.integrations.ops.op`` wraps ``__call__`` and ``backward`` in the generic
        ``attncc::attention`` custom op (this needs a ``backward`` for gradients). Where set,
        ``fn.op`` (the forward operator) and ``fn.args(q, k, v, **inputs)`` (its arguments for
        one call) serve opcheck and tests, and ``fn.ops`` may name the others (any object)."""
        return None

    def traceable(self) -> Callable | None:
        """A function ``fn(q, k, v, **inputs) -> out | None`` that ``torch.compile`` traces in
        place of the library op (``attncc.integrations.ops.op`` calls it only while
        ``torch.compiler.is_compiling()``), so the compiler sees the computation itself (e.g.
        ``scaled_dot_product_attention``, with torch's own backward) instead of an opaque op.

        Contract: ``traceable()`` is called eagerly (once per op); ``fn`` is made only of
        operations dynamo traces (torch ops on the tensors, plain Python on sizes and
        constants: no sympy, numpy, database or compile step) and returns what ``__call__``
        returns for the call, gradients through torch's autograd; or None to decline the call,
        which then runs through the library op. It declines every call it cannot check that the
        eager prologue would reject (rank, dtypes, devices, head counts, inputs), so such a call
        still gets attncc's InputError. Default: None (always the library op)."""
        return None


class Backend(ABC):
    """A code generator for one kind of kernel. Subclasses set ``name`` and implement all four.

    ``version`` enters tuning-database keys (bump it when a config's meaning or speed changes);
    ``library`` is the array library its kernels take and return: ``"numpy"`` or ``"torch"``
    (the CLI, the conformance suite and the tuner make inputs of that kind).
    """

    name: str
    version: str = "0"
    library: str = "torch"

    @abstractmethod
    def supports(self, graph, target) -> Support:
        """Whether this backend can run ``graph`` on ``target``; the reason if not."""

    @abstractmethod
    def search_space(self, graph, target) -> SearchSpace:
        """The tunables for ``graph`` on ``target``, with a keep() filter for invalid configs.

        ``graph.graph`` may carry ``"sizes"`` (batch, seq_q, seq_k) and ``"dtype"`` (the element
        type the config must fit, e.g. ``"bfloat16"``) when the caller knows them (the tuner
        always sets both; ``attncc.compile`` sets the dtype); without a dtype, keep() checks
        float32. ``default_config`` reads the same keys."""

    @abstractmethod
    def default_config(self, graph, target) -> dict:
        """A config that works for ``graph`` on ``target`` without tuning."""

    @abstractmethod
    def compile(self, graph, config: dict, target) -> Kernel:
        """The kernel for a lowered ``graph`` (``attncc.passes.pipeline.lower``) with ``config``
        (every tunable set; ``attncc.backends.config.full_config`` checks and completes one) on
        ``target``.

        What to compute is the attention node (``attncc.ir.graph.attention_node(graph)``): its
        fields and its ``lowering`` (the paths the strategy pass allows, and why).
        ``graph.graph["spec"]`` is the Spec, for ``Kernel.spec`` and for checking calls against
        its declared inputs (``attncc.lowering.prologue``); ``graph.graph["sizes"]`` and
        ``["dtype"]`` are set where the caller knows them (see ``search_space``)."""

    def priority(self, target) -> int:
        """Expected speed on ``target`` relative to other backends (higher is faster).

        ``backend="auto"`` picks the supported backend with the highest priority when no tuning
        record decides; a backend that only emulates on this target should return a negative value.
        """
        return 0
