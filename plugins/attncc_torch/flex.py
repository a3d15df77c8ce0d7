"""The ``flex`` path: FlexAttention's compiled CPU forward for score_mods no fused SDPA call takes.

A non-additive score_mod (tanh soft-capping, ``score * slope[h]``) cannot enter SDPA's float
mask, so the ``runs`` path cannot serve it. ``torch.nn.attention.flex_attention`` under
``torch.compile`` inlines a score_mod and a mask_mod into one fused CPU kernel and skips the key
blocks a ``BlockMask`` leaves out. attncc gives it both without evaluating the mask over N^2
pairs:

- the score_mod and the mask are printed from the fused node as torch source (``FlexPrinter``,
  the sizes of the call substituted, so sympy folds them), one module per call shape that a
  person can read (``FlexRunner.source``);
- the ``BlockMask`` is attncc's own block plan (``attncc.plan``, 128x128 blocks, FlexAttention's
  default) through ``BlockMask.from_kv_blocks``: FULL blocks skip the mask_mod, EMPTY blocks are
  never visited.

The inputs the expressions read are arguments of the compiled function, so new mask data or new
inputs never recompile; a new call shape does (``dynamic=False``: dynamic shapes ran 2x slower
here), so one runner serves at most ``MAX_SHAPES`` shapes and short query blocks (decoding,
``seq_q < MIN_ROWS``) never come here. FlexAttention on CPU has no backward and no log-sum-exp
(torch 2.13), so the path serves CPU forwards without gradients and without ``return_lse``.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import sympy
import torch
from sympy.printing.pytorch import TorchPrinter
from torch._guards import detect_fake_mode

from attncc.plan import PlanCache
from attncc.spec import symbols

#: Block size of the plan handed to FlexAttention (its default on CPU).
FLEX_BLOCK = 128
#: Call shapes one runner compiles before it leaves new shapes to the tile loop.
MAX_SHAPES = 8
#: The dtypes FlexAttention's CPU kernel takes (float64 is refused at compile time).
FLEX_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Query rows below which a call takes the tile loop (a decoding step would recompile per key
#: length).
MIN_ROWS = 128

_FUNCTIONS = {symbols.sigmoid: "torch.sigmoid", symbols.Round: "torch.round",
              symbols.Log2: "torch.log2"}


class FlexPrinter(TorchPrinter):
    """torch source of a spec expression over 0-d tensors (FlexAttention's score_mod and
    mask_mod arguments): input reads as ``name[i, j]``, two-argument maximum/minimum as
    ``torch.maximum``/``torch.minimum``, Python numbers as tensors where a torch function needs
    one. Raises ``PrintMethodNotImplementedError`` for what it cannot print (reductions, bit
    operations): the caller then takes another path."""

    def _print_Indexed(self, expr):
        return f"{expr.base}[{', '.join(self._print(i) for i in expr.indices)}]"

    def _print_Function(self, expr):
        name = _FUNCTIONS.get(type(expr))
        if name is None:
            return super()._print_Function(expr)
        return f"{name}({self._tensor(expr.args[0])})"

    def _tensor(self, expr) -> str:
        text = self._print(expr)
        return f"torch.tensor({text})" if expr.is_Number else text

    def _extreme(self, expr, fn: str) -> str:
        return functools.reduce(lambda text, a: f"{fn}({text}, {a})",
                                [self._tensor(a) for a in expr.args])

    def _print_floor(self, expr):
        """``floor(a / d)`` of integers as ``a // d`` (an integer tensor, usable as an index),
        as ``attncc.spec.numeric`` computes it; anything else as torch.floor."""
        num, den = sympy.fraction(sympy.together(expr.args[0]))
        if den != 1 and num.is_integer and den.is_integer:
            return f"({self._print(num)}) // ({self._print(den)})"
        return self._print_Function(expr)

    def _print_Max(self, expr):
        return self._extreme(expr, "torch.maximum")

    def _print_Min(self, expr):
        return self._extreme(expr, "torch.minimum")


def _tracing(x) -> bool:
    """Whether ``x`` is being traced (torch.compile of a model calling attncc's op, fake
    tensors): a nested torch.compile cannot run there, so the tile loop serves the call."""
    return torch.compiler.is_compiling() or detect_fake_mode([x]) is not None


def printable(node) -> str | None:
    """Why ``FlexPrinter`` cannot print the node's score_mod or mask, or None when it can."""
    for what, expr in (("score_mod", node.score_mod),
                       ("mask", node.mask.expr if node.mask is not None else None)):
        if expr is None:
            continue
        try:
            FlexPrinter().doprint(expr)
        except Exception as err:  # any printer failure means "not this path"
            return f"the {what} does not print as torch code ({type(err).__name__})"
    return None


def _module_text(node, sizes: dict, inputs: tuple[str, ...]) -> str:
    """The source of ``attend(q, k, v, blocks..., inputs...)`` for one call shape."""
    subs = {symbols.SIZES[n]: int(sizes[n]) for n in symbols.SIZE_NAMES if n in sizes}
    printer = FlexPrinter()
    params = "".join(f", {n}" for n in inputs)
    lines = ["import torch",
             "from torch.nn.attention.flex_attention import BlockMask, flex_attention", "",
             "",
             f"def attend(q, k, v, full_n, full_i, part_n, part_i, scale{params}):"]
    score = "None"
    if node.score_mod is not None:
        lines += ["    def score_mod(score, b, h, q_idx, kv_idx):",
                  f"        return {printer.doprint(node.score_mod.subs(subs))}", ""]
        score = "score_mod"
    mask = "None"
    if node.mask is not None:
        lines += ["    def mask_mod(b, h, q_idx, kv_idx):",
                  f"        return {printer.doprint(node.mask.expr.subs(subs))}", ""]
        mask = "mask_mod"
    gqa = sizes["heads"] != sizes["kv_heads"]
    lines += [
        "    blocks = BlockMask.from_kv_blocks(",
        f"        part_n, part_i, full_n, full_i, BLOCK_SIZE=({FLEX_BLOCK}, {FLEX_BLOCK}),",
        f"        mask_mod={mask}, seq_lengths=({sizes['seq_q']}, {sizes['seq_k']}))",
        f"    return flex_attention(q, k, v, score_mod={score}, block_mask=blocks, scale=scale,",
        f"                          enable_gqa={gqa})", ""]
    return "\n".join(lines)


class FlexRunner:
    """The flex path of one kernel: ``runner(call) -> out`` or None when this call is not for
    it (see the module docstring); compiled modules per call shape, plans per sizes and mask
    inputs (``PlanCache`` in 128x128 blocks)."""

    def __init__(self, node, spec):
        self.node = node
        self.plans = PlanCache(node, FLEX_BLOCK, FLEX_BLOCK)
        names = set()
        for expr in (node.score_mod, node.mask.expr if node.mask is not None else None):
            if expr is not None:
                names |= {str(x.base) for x in expr.atoms(sympy.Indexed)}
                names |= {s.name for s in expr.free_symbols if s.name in spec.inputs}
        self.inputs = tuple(sorted(names))
        self._compiled: dict = {}
        self.broken = False
        self.source = ""  # the module text of the latest shape compiled

    def serves(self, call) -> bool:
        q = call.q
        return (not self.broken and q.device.type == "cpu" and q.shape[2] >= MIN_ROWS
                and q.dtype in FLEX_DTYPES and not _tracing(q)
                and call.v.shape[-1] == q.shape[-1]
                and (self._key(call) in self._compiled or len(self._compiled) < MAX_SHAPES))

    @staticmethod
    def _key(call):
        return (tuple(sorted(call.sizes.items())), call.q.dtype)

    def __call__(self, call):
        """The output of ``call`` (a ``Call`` of the prologue), or None when torch.compile
        fails here (no C++ compiler for inductor, say): then the runner stays off, with one
        warning, and the kernel takes the tile loop."""
        key = self._key(call)
        fn = self._compiled.get(key)
        if fn is None:
            self.source = _module_text(self.node, call.sizes, self.inputs)
            scope: dict = {}
            exec(compile(self.source, "<attncc flex>", "exec"), scope)  # noqa: S102
            fn = torch.compile(scope["attend"], dynamic=False, fullgraph=True)
        plan = self.plans.get(call.sizes, call.raw_inputs)
        args = (call.q, call.k, call.v, *self._tables(plan), call.scale,
                *(call.inputs[n] for n in self.inputs))
        if key in self._compiled:
            return fn(*args)
        try:
            out = fn(*args)
        except Exception as err:  # inductor's failures have many types
            self.broken = True
            warnings.warn(f"attncc: the flex path is off for this kernel, torch.compile of "
                          f"FlexAttention failed ({type(err).__name__}: {str(err)[:200]}); "
                          "the tile loop serves it", RuntimeWarning, stacklevel=3)
            return None
        self._compiled[key] = fn
        return out

    def _tables(self, plan) -> list[torch.Tensor]:
        """The plan's FULL and PARTIAL block tables as FlexAttention takes them: counts
        ``(Bp, Hp, nQ)`` and indices ``(Bp, Hp, nQ, nK)`` (the width says how many key blocks
        the mask covers; attncc's tables are only as wide as the longest row)."""
        cache = plan.__dict__.setdefault("_flex_tables", [])
        if not cache:
            width = plan.num_kv_blocks
            for table in (plan.full_counts, plan.full_index, plan.partial_counts,
                          plan.partial_index):
                t = torch.from_numpy(np.array(table, dtype=np.int32))
                if t.dim() == 4:
                    t = torch.nn.functional.pad(t, (0, width - t.shape[-1]))
                cache.append(t)
        return cache
