"""The ``strategy`` pass: which lowering paths serve the attention node, and why (DESIGN §4).

It records on the fused node (``FusedAttention``, ``LinearAttention``, ``Nystrom``) a
backend-neutral ``Lowering``: one ``Path(name, ok, why)`` per path of ``PATHS`` for that node
type, most specialised first. Backends read ``node.lowering.allows(name)`` instead of working the
facts out again from the spec; ``attncc show`` prints every path with its reason. The paths:

- ``sdpa``: the whole call is one fused dense or causal softmax kernel (torch's
  ``scaled_dot_product_attention``): a dot score, softmax, no score_mod, no runtime input, no
  memory tokens, no projection, and the mask absent or exactly causal, top-left
  (``kv_idx <= q_idx``) or bottom-right (``kv_idx <= q_idx + seq_k - seq_q``, decoding).
  Grouped-query heads are no blocker: the fused kernels take K/V with ``kv_heads`` heads
  (``enable_gqa``), never a copy per query head.
- ``runs``: fused softmax calls over runs of consecutive key blocks of the block plan, the mask
  entering as additive 0/-inf tiles: a dot score, softmax, no memory tokens, and no score_mod
  or an additive one (``score + bias``, ``additive_bias``) whose bias joins the tiles
  (``bias_form``: ``key``, a row term plus a key term, only the key term needed, O(N) per head;
  ``toeplitz``, a function of ``q_idx - kv_idx``; ``general``, evaluated per run tile).
- ``flex``: a compiled FlexAttention forward over the plan, for a score_mod no fused SDPA call
  takes (not an additive bias): a dot score, softmax, no memory tokens, no projection.
- ``decode``: for a few query rows (a decoding step against a KV cache), one pass over the
  whole ``(batch, heads, seq_q, seq_k)`` scores: a dot score, softmax, no memory tokens, no
  projection, where ``sdpa`` does not serve; any score_mod and mask (backends choose it by the
  call's ``seq_q``).
- ``tiles``: the block-sparse tile loop over the plan; serves every ``FusedAttention``.
- ``scan``: the chunked scan of running sums of ``LinearAttention``.
- ``nystrom``: the landmark products of ``Nystrom``.

The patterns are recognised from the node's fields and the structure of its sympy expressions,
never from spec names; the spec is read only for the sizes it fixes (heads, kv_heads). Later
paths are one more rule in ``PATHS``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import networkx as nx
import sympy

from attncc.ir.graph import (
    ATTENTION_NODES,
    FusedAttention,
    LinearAttention,
    Lowering,
    Nystrom,
    Path,
    derive,
    op,
    operands,
)
from attncc.spec.symbols import SIZES, kv_idx, q_idx, score

__all__ = ["OFFSET", "PATHS", "Strategy", "additive_bias", "bias_form", "causal_alignment",
           "decode_fused", "is_top_left_causal", "toeplitz_bias"]


@dataclass(frozen=True)
class Strategy:
    """Record a ``Lowering`` on every attention node of a fused graph."""

    name: str = "strategy"

    def apply(self, graph: nx.DiGraph) -> nx.DiGraph:
        result = derive(graph, self.name)
        spec = graph.graph.get("spec")
        for node_id in sorted(result.nodes):
            node = op(result, node_id)
            if isinstance(node, ATTENTION_NODES):
                reads = [op(result, a).name for a in operands(result, node_id)[3:]]
                paths = tuple(rule(node, reads, spec) for rule in PATHS[type(node)])
                result.nodes[node_id]["op"] = dataclasses.replace(node, lowering=Lowering(paths))
        return result


def is_top_left_causal(mask: sympy.Basic | None) -> bool:
    """Whether ``mask`` is exactly ``kv_idx <= q_idx`` in any linear integer form
    (``q_idx >= kv_idx``, ``kv_idx < q_idx + 1``, ``2*kv_idx - 2*q_idx <= 1``)."""
    return causal_alignment(mask) == "top_left"


def causal_alignment(mask: sympy.Basic | None) -> str | None:
    """``top_left`` where ``mask`` is exactly ``kv_idx <= q_idx``, ``bottom_right`` where it is
    exactly ``kv_idx <= q_idx + seq_k - seq_q`` (a KV cache), in any linear integer form; else
    None."""
    if not isinstance(mask, sympy.Rel) or isinstance(mask, sympy.Eq | sympy.Ne):
        return None
    diff = sympy.expand(mask.lhs - mask.rhs)  # the mask says diff <= 0 (or <, >=, >)
    if isinstance(mask, sympy.GreaterThan | sympy.StrictGreaterThan):
        diff = -diff
    a = diff.coeff(kv_idx)
    if not (a.is_Rational and a > 0):
        return None
    for name, shift in (("top_left", 0), ("bottom_right", SIZES["seq_k"] - SIZES["seq_q"])):
        c = sympy.expand(diff - a * (kv_idx - q_idx - shift))  # diff = a*(kv - q - shift) + c
        if not c.is_Rational:
            continue
        # a*t + c <= 0  <=>  t <= floor(-c/a);  a*t + c < 0  <=>  t <= ceil(-c/a) - 1
        if isinstance(mask, sympy.StrictLessThan | sympy.StrictGreaterThan):
            ok = sympy.ceiling(-c / a) - 1 == 0
        else:
            ok = sympy.floor(-c / a) == 0
        return name if ok else None
    return None


@functools.lru_cache(maxsize=256)
def additive_bias(score_mod: sympy.Basic | None) -> sympy.Basic | None:
    """``bias`` where ``score_mod`` is ``score + bias`` (d score_mod / d score == 1, and the
    bias free of ``score``), e.g. ALiBi's ``-slope[h]*(q_idx - kv_idx)`` or a table
    ``bias[h, q_idx - kv_idx + seq_k - 1]``; None for no score_mod or a non-additive one."""
    if score_mod is None:
        return None
    # structural, not sympy.simplify (which recursed forever on max(score, 0.1) % 0.3 + score):
    # the expanded remainder free of score is the bias, so d score_mod / d score == 1
    bias = sympy.expand(score_mod - score)
    return None if bias.has(score) else bias


@functools.lru_cache(maxsize=256)
def bias_form(bias: sympy.Basic) -> str:
    """How a fused kernel's float mask can hold ``bias``:

    - ``key``: ``bias(q, kv) = bias(q, 0) + bias(0, kv) - bias(0, 0)`` exactly, a row term
      (which softmax cancels; only the log-sum-exp sees it) plus a key term ``bias(0, kv)``
      (ALiBi): O(keys) per head;
    - ``toeplitz``: a function of ``q_idx - kv_idx`` (relative tables): O(queries + keys) per
      head, a Hankel view over key-reversed K/V;
    - ``general``: anything else (``abs(q_idx - kv_idx)``, ``hf_bias[b, q_idx, kv_idx]``),
      evaluated per tile.
    """
    rest = (bias - bias.subs(kv_idx, 0) - bias.subs(q_idx, 0)
            + bias.subs({q_idx: 0, kv_idx: 0}))
    if sympy.expand(rest) == 0:
        return "key"
    return "general" if kv_idx in toeplitz_bias(bias).free_symbols else "toeplitz"


#: The offset ``q_idx - kv_idx`` of a Toeplitz bias (any sign, unlike the index symbols).
OFFSET = sympy.Symbol("offset", integer=True)


def toeplitz_bias(bias: sympy.Basic) -> sympy.Basic:
    """``bias`` with ``q_idx`` replaced by ``kv_idx + OFFSET``: free of ``kv_idx`` exactly when
    the bias is a function of ``q_idx - kv_idx``."""
    return sympy.expand(bias.subs(q_idx, kv_idx + OFFSET))


def _softmax_blockers(node: FusedAttention, bias_ok: bool = False) -> list[str]:
    """Why a fused softmax kernel cannot compute ``node``: what it has beyond dot + softmax
    (an additive score_mod is no blocker where ``bias_ok``: it joins the kernel's float mask)."""
    why = []
    if node.score != "dot":
        why.append(f"the score is {node.score}, not a dot product")
    if node.normalize != "softmax":
        why.append(f"normalize is {node.normalize}, not softmax")
    if node.score_mod is not None and not (bias_ok and additive_bias(node.score_mod) is not None):
        read = sorted(str(e) for e in node.score_mod.atoms(sympy.Indexed))
        why.append(f"score_mod reads {', '.join(read)}" if read
                   else f"score_mod rewrites the score ({_short(node.score_mod)})")
    if node.memory_tokens:
        why.append(f"{node.memory_tokens} memory token(s) skip the mask and score_mod")
    return why


def _sdpa(node: FusedAttention, reads: list[str], spec) -> Path:
    why = _softmax_blockers(node)
    if node.projection is not None:
        why.append(f"k and v are projected to {node.projection} keys")
    if node.mask is not None and causal_alignment(node.mask.expr) is None:
        why.append(f"the mask ({_short(node.mask.expr)}) is not exactly kv_idx <= q_idx "
                   f"(top-left or bottom-right aligned)")
    if reads and not why:  # inputs read by nothing above (a mask, a score_mod) block it too
        why.append(f"it reads the input(s) {', '.join(sorted(reads))}")
    if why:
        return Path("sdpa", False, "; ".join(why))
    if node.mask is None:
        return Path("sdpa", True, "dense dot-product softmax: one fused attention call")
    if causal_alignment(node.mask.expr) == "top_left":
        return Path("sdpa", True, "causal dot-product softmax: one fused attention call")
    return Path("sdpa", True, "bottom-right causal dot-product softmax (a KV cache): one fused "
                              "attention call, the mask a cached zero-copy 0/-inf tile")


def _runs(node: FusedAttention, reads: list[str], spec) -> Path:
    why = _softmax_blockers(node, bias_ok=True)
    if why:
        return Path("runs", False, "; ".join(why))
    tiles = "the mask as additive 0/-inf tiles" if node.mask is not None else "no mask"
    bias = additive_bias(node.score_mod)
    if bias is not None:
        tiles += f", the additive bias {_short(bias, 40)} ({bias_form(bias)} form) in the tiles"
    return Path("runs", True, f"dot-product softmax: fused calls over runs of key blocks, "
                              f"{tiles}")


def _flex(node: FusedAttention, reads: list[str], spec) -> Path:
    why = [w for w in _softmax_blockers(node) if not w.startswith("score_mod")]
    if node.score_mod is None or additive_bias(node.score_mod) is not None:
        why.append("no score_mod beyond an additive bias (the runs path serves those)")
    if node.projection is not None:
        why.append(f"k and v are projected to {node.projection} keys")
    if why:
        return Path("flex", False, "; ".join(why))
    return Path("flex", True, f"FlexAttention's compiled forward inlines the score_mod "
                              f"({_short(node.score_mod, 40)}) over attncc's block plan")


def _decode(node: FusedAttention, reads: list[str], spec) -> Path:
    why = [w for w in _softmax_blockers(node) if not w.startswith("score_mod")]
    if node.projection is not None:
        why.append(f"k and v are projected to {node.projection} keys")
    if not why and _sdpa(node, reads, spec).ok:
        why.append("the sdpa path serves it (one fused call for any seq_q)")
    if why:
        return Path("decode", False, "; ".join(why))
    if decode_fused(node):
        how = "one fused SDPA call, the mask (and bias) evaluated once over the call's tile"
    else:
        how = "scores, score_mod and mask evaluated once over (batch, heads, seq_q, seq_k)"
    return Path("decode", True, f"dot-product softmax: for a few query rows (a decoding step), "
                                f"{how}")


def decode_fused(node: FusedAttention) -> bool:
    """Whether one SDPA call serves the node's decoding steps: no score_mod, or an additive one
    (its bias joins the float mask)."""
    return node.score_mod is None or additive_bias(node.score_mod) is not None


def _tiles(node: FusedAttention, reads: list[str], spec) -> Path:
    return Path("tiles", True, "the block-sparse tile loop over the plan serves any fused "
                               "attention")


def _scan(node: LinearAttention, reads: list[str], spec) -> Path:
    order = "causal: running prefix sums" if node.causal else "dense: one sum over all keys"
    return Path("scan", True, f"{node.feature_map} feature map, chunked scan ({order})")


def _nystrom(node: Nystrom, reads: list[str], spec) -> Path:
    return Path("nystrom", True, f"{node.landmarks} segment-mean landmarks")


#: The path rules per attention node type, most specialised first.
PATHS: dict[type, tuple[Callable[..., Path], ...]] = {
    FusedAttention: (_sdpa, _runs, _flex, _decode, _tiles),
    LinearAttention: (_scan,),
    Nystrom: (_nystrom,),
}


def _short(expr, limit: int = 60) -> str:
    text = str(expr)
    return text if len(text) <= limit else text[:limit - 3] + "..."
