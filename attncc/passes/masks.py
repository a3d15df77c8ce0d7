"""The ``masks`` pass: what a mask reads, so the block plan knows how to classify it (DESIGN §4).

For the ``Mask`` node (or the mask inside a ``FusedAttention``) it fills ``reads_inputs`` (the
runtime inputs the expression reads, sorted) and ``varies_with`` (which of ``b``, ``h`` it depends
on, directly or through an input indexed by them). An index-only mask is classified once per
shape (``attncc.plan`` caches it); a mask that reads inputs is classified at call time from
per-block min/max of those inputs. The classification itself is ``attncc.plan.build_plan``,
from these annotations.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import networkx as nx
import sympy

from attncc.ir.graph import FusedAttention, Mask, derive

__all__ = ["Masks"]


def _annotated(mask: Mask) -> Mask:
    """``mask`` with ``reads_inputs`` (sorted input names) and ``varies_with`` (of b, h)."""
    reads = tuple(sorted({str(i.base.label) for i in mask.expr.atoms(sympy.Indexed)}))
    names = {s.name for s in mask.expr.free_symbols if isinstance(s, sympy.Symbol)}
    varies = tuple(n for n in ("b", "h") if n in names)
    return dataclasses.replace(mask, reads_inputs=reads, varies_with=varies)


@dataclass(frozen=True)
class Masks:
    """Annotate every mask in the graph with the inputs it reads and the axes it varies with."""

    name: str = "masks"

    def apply(self, graph: nx.DiGraph) -> nx.DiGraph:
        result = derive(graph, self.name)
        for _, data in result.nodes(data=True):
            node = data["op"]
            if isinstance(node, Mask):
                data["op"] = _annotated(node)
            elif isinstance(node, FusedAttention) and node.mask is not None:
                data["op"] = dataclasses.replace(node, mask=_annotated(node.mask))
        return result
