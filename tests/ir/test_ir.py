"""The IR builder, verify() and the printer."""

from __future__ import annotations

import dataclasses
import re

import networkx as nx
import pytest
import sympy

from attncc import load_spec
from attncc.ir.build import build
from attncc.ir.graph import (
    Aggregate,
    FeatureMap,
    FusedAttention,
    Input,
    LinearAggregate,
    Lowering,
    LowRankProject,
    Mask,
    MemoryConcat,
    Node,
    Normalize,
    Nystrom,
    Output,
    Path,
    Score,
    add,
    attention_node,
    derive,
    new_graph,
    op,
    operands,
)
from attncc.ir.printer import print_graph
from attncc.ir.verify import IRError, verify
from attncc.passes.pipeline import lower
from attncc.passes.shapes import Shapes

SLIDING = {"attncc": 1, "name": "sliding_alibi", "heads": 8, "kv_heads": 2,
           "score_mod": "score - slope[h] * (q_idx - kv_idx)",
           "mask": "kv_idx <= q_idx and q_idx - kv_idx < window", "constants": {"window": 64},
           "inputs": {"slope": {"shape": ["heads"], "dtype": "float32"}}}


def kinds(graph) -> dict[str, str]:
    return {n: op(graph, n).op_name for n in graph.nodes}


def test_build_softmax_chain_has_readable_ids_and_operands():
    graph = verify(build(SLIDING))
    assert kinds(graph) == {"q": "Input", "k": "Input", "v": "Input", "slope": "Input",
                            "score": "Score", "score_mod": "ScoreMod", "mask": "Mask",
                            "normalize": "Normalize", "aggregate": "Aggregate", "out": "Output"}
    assert operands(graph, "score") == ["q", "k"]
    assert operands(graph, "score_mod") == ["score", "slope"]
    assert operands(graph, "mask") == ["score_mod"]
    assert operands(graph, "aggregate") == ["normalize", "v"]
    assert op(graph, "score") == Score(kind="dot", scale=1 / sympy.sqrt(sympy.Symbol(
        "head_dim", integer=True, positive=True)))
    assert op(graph, "slope") == Input(name="slope", role="input", dtype="float32")
    assert graph.graph["spec"] == load_spec(SLIDING)
    assert graph.graph["passes"] == ()


def test_build_memory_tokens_and_linformer_put_nodes_on_k_and_v():
    mem = build({"attncc": 1, "memory_tokens": 4})
    assert op(mem, "k_mem") == MemoryConcat(tokens=4)
    assert operands(mem, "k_mem") == ["k", "mem_k"]
    assert operands(mem, "v_mem") == ["v", "mem_v"]
    assert operands(mem, "score") == ["q", "k_mem"]
    assert operands(mem, "aggregate") == ["normalize", "v_mem"]
    lin = build({"attncc": 1, "lowrank": {"method": "linformer", "rank": 16}})
    assert op(lin, "k_proj") == LowRankProject(rank=16)
    assert operands(lin, "k_proj") == ["k", "E"]
    assert operands(lin, "v_proj") == ["v", "F"]
    assert operands(lin, "score") == ["q", "k_proj"]


def test_build_additive_topk_linear_and_nystrom():
    additive = build({"attncc": 1, "score": "additive", "normalize": "topk", "topk": 2})
    assert operands(additive, "score") == ["q", "k", "w"]
    assert op(additive, "score").kind == "additive"
    assert op(additive, "normalize") == Normalize(kind="topk", topk=2)
    linear = build({"attncc": 1, "normalize": "linear", "feature_map": "performer",
                    "features": 8, "mask": "kv_idx <= q_idx"})
    assert op(linear, "phi_q") == FeatureMap(kind="performer", features=8)
    assert operands(linear, "phi_k") == ["k", "omega"]
    assert op(linear, "aggregate") == LinearAggregate(causal=True)
    assert operands(linear, "aggregate") == ["phi_q", "phi_k", "v"]
    plain = build({"attncc": 1, "normalize": "linear"})
    assert op(plain, "aggregate") == LinearAggregate(causal=False)
    assert operands(plain, "phi_q") == ["q"]
    nystrom = build({"attncc": 1, "lowrank": {"method": "nystrom", "landmarks": 4}})
    assert isinstance(op(nystrom, "nystrom"), Nystrom)
    assert operands(nystrom, "out") == ["nystrom"]
    for graph in (additive, linear, plain, nystrom):
        verify(graph)


def test_build_avoids_id_clashes_between_inputs_and_nodes():
    spec = {"attncc": 1, "mask": "mask[b, kv_idx] > 0",
            "inputs": {"mask": {"shape": ["batch", "seq_k"], "dtype": "int32"}}}
    graph = verify(build(spec))
    assert op(graph, "mask") == Input(name="mask", role="input", dtype="int32")
    assert isinstance(op(graph, "mask_"), Mask)
    assert operands(graph, "mask_") == ["score", "mask"]


def _tiny() -> nx.DiGraph:
    graph = new_graph(None)
    add(graph, "q", Input(name="q", role="q"))
    add(graph, "k", Input(name="k", role="k"))
    add(graph, "v", Input(name="v", role="v"))
    add(graph, "score", Score(kind="dot", scale=sympy.Integer(1)), "q", "k")
    add(graph, "normalize", Normalize(kind="softmax"), "score")
    add(graph, "aggregate", Aggregate(), "normalize", "v")
    add(graph, "out", Output(), "aggregate")
    return graph


def test_verify_accepts_a_well_formed_graph():
    graph = _tiny()
    assert verify(graph) is graph


def _bad_role(graph):
    add(graph, "w", Input(name="w", role="weights"))
    graph.add_edge("w", "score", port=2)


def _port_gap_on_aggregate(graph):
    graph.remove_edge("normalize", "aggregate")
    graph.add_edge("normalize", "out", port=1)


BREAKAGES = {
    "cycle": (lambda g: g.add_edge("aggregate", "score", port=2), "the graph has a cycle"),
    "missing op": (lambda g: g.nodes["normalize"].pop("op"), "'normalize': expected an 'op'"),
    "op not a node": (lambda g: g.nodes["normalize"].update(op="Normalize"), "got str"),
    "bare Node": (lambda g: g.nodes["normalize"].update(op=Node()), "Node subclass"),
    "port gap": (lambda g: g.edges["k", "score"].update(port=2), "operand ports [0, 2]"),
    "port repeat": (lambda g: g.edges["k", "score"].update(port=0), "operand ports [0, 0]"),
    "port not int": (lambda g: g.edges["k", "score"].update(port="1"), "expected an int"),
    "two outputs": (lambda g: add(g, "out2", Output(), "aggregate"),
                    "exactly one Output node, found 2: ['out', 'out2']"),
    "no output": (lambda g: g.remove_node("out"), "exactly one Output node, found 0"),
    "output read": (lambda g: add(g, "extra", Normalize(kind="softmax"), "out"),
                    "Output is read by ['extra']"),
    "unread input": (lambda g: add(g, "slope", Input(name="slope", role="input")),
                     "input 'slope' (slope) is read by no node"),
    "input with operand": (lambda g: g.add_edge("q", "k", port=0),
                           "'k' (Input): expected 0 operands, got 1"),
    "bad role": (_bad_role, "role 'weights'"),
    "removed operand": (_port_gap_on_aggregate, "'aggregate' (Aggregate): operand ports [1]"),
}


@pytest.mark.parametrize("case", sorted(BREAKAGES))
def test_verify_catches_broken_graphs(case):
    breakage, message = BREAKAGES[case]
    graph = _tiny()
    breakage(graph)
    with pytest.raises(IRError, match=re.escape(message)):
        verify(graph)


def test_verify_checks_arity_and_spec_inputs():
    graph = _tiny()
    add(graph, "x", Input(name="x", role="x"))
    graph.remove_node("x")
    graph.remove_edge("k", "score")
    with pytest.raises(IRError, match=r"'score' \(Score\): expected 2..3 operands, got 1"):
        verify(graph)
    spec_graph = build(SLIDING)
    nx.relabel_nodes(spec_graph, {"slope": "doc"}, copy=False)
    spec_graph.nodes["doc"]["op"] = Input(name="doc", role="input")
    with pytest.raises(IRError, match="'doc' is not an input of the spec 'sliding_alibi'"):
        verify(spec_graph)


def test_verify_requires_shapes_after_the_shapes_pass():
    graph = Shapes().apply(build(SLIDING))
    verify(graph)
    graph.nodes["mask"]["op"] = dataclasses.replace(op(graph, "mask"), shape=None)
    with pytest.raises(IRError, match=r"'mask' \(Mask\) has no shape"):
        verify(graph)
    unshaped = derive(build(SLIDING), "fuse")
    verify(unshaped)


def test_printer_lines_and_stability():
    graph = build(SLIDING)
    text = print_graph(graph)
    lines = text.splitlines()
    assert lines[0] == "# sliding_alibi (passes: none)"
    assert "%score = Score(kind=dot, scale=1/sqrt(head_dim))(%q, %k)" in lines
    assert "%out = Output()(%aggregate)" in lines
    assert "%q = Input(name=q, role=q, dtype=float)" in lines
    assert lines.index("%score = Score(kind=dot, scale=1/sqrt(head_dim))(%q, %k)") > \
        lines.index("%q = Input(name=q, role=q, dtype=float)")
    # Same graph, nodes inserted in another order: same text.
    shuffled = nx.DiGraph()
    shuffled.graph.update(graph.graph)
    for node_id in sorted(graph.nodes, reverse=True):
        shuffled.add_node(node_id, **graph.nodes[node_id])
    shuffled.add_edges_from(sorted(graph.edges(data=True), reverse=True))
    assert print_graph(shuffled) == text
    shaped = print_graph(Shapes().apply(graph))
    assert ("%score = Score(kind=dot, scale=1/sqrt(head_dim))(%q, %k) : "
            "[batch, heads, seq_q, seq_k]") in shaped.splitlines()
    assert shaped.splitlines()[0] == "# sliding_alibi (passes: shapes)"


def test_printer_prints_embedded_nodes_and_cost():
    graph = new_graph(None)
    for role in ("q", "k", "v"):
        add(graph, role, Input(name=role, role=role))
    mask = Mask(expr=sympy.Symbol("x") > 0, reads_inputs=("doc",), varies_with=("b",))
    add(graph, "attention", FusedAttention(score="dot", scale=sympy.Integer(1), score_mod=None,
                                           mask=mask, normalize="softmax", topk=None,
                                           memory_tokens=0), "q", "k", "v")
    add(graph, "out", Output(), "attention")
    graph.graph["cost"] = {"flops": sympy.Symbol("n") * 2, "density": sympy.Integer(1)}
    text = print_graph(graph)
    assert text.startswith("# graph (passes: none)\n")
    assert ("%attention = FusedAttention(score=dot, scale=1, score_mod=None, mask=Mask(expr=x > 0,"
            " reads_inputs=[doc], varies_with=[b]), normalize=softmax, topk=None, "
            "memory_tokens=0, projection=None, lowering=None)(%q, %k, %v)") in text.splitlines()
    assert text.endswith("# cost.flops = 2*n\n# cost.density = 1\n")


def test_printer_prints_the_lowering_on_the_node_and_its_reasons_after():
    # a non-additive score_mod (an additive one is served by the runs path's bias tiles)
    graph = lower({"attncc": 1, "name": "scaled", "score_mod": "score * slope[h]",
                   "inputs": {"slope": {"shape": ["heads"], "dtype": "float32"}}})
    lines = print_graph(graph).splitlines()
    node = ("lowering=Lowering(sdpa=no, runs=no, flex=yes, decode=yes, tiles=yes))"
            "(%q, %k, %v, %slope)")
    assert any(node in line for line in lines)
    assert "# lowering.sdpa = no: score_mod reads slope[h]" in lines
    assert lines.index("# lowering.tiles = yes: the block-sparse tile loop over the plan serves "
                       "any fused attention") < lines.index("# cost.density = 1")


def test_lowering_allows_and_why():
    lowering = Lowering((Path("sdpa", False, "the mask is a band"), Path("tiles", True, "any")))
    assert not lowering.allows("sdpa") and lowering.allows("tiles")
    assert not lowering.allows("decode")
    assert lowering.why("sdpa") == "the mask is a band"
    assert lowering.why("decode") == "'decode' is not a lowering path of this node (it has sdpa, " \
                                     "tiles)"


def _attention_replaced(graph, **fields):
    node_id, node = attention_node(graph)
    graph.nodes[node_id]["op"] = dataclasses.replace(node, **fields)
    return graph


@pytest.mark.parametrize(("spec", "fields", "message"), [
    ({"attncc": 1}, {"projection": 8}, "projection=8, but its keys come from Input (rank None)"),
    ({"attncc": 1, "lowrank": {"method": "linformer", "rank": 4}}, {"projection": None},
     "projection=None, but its keys come from LowRankProject (rank 4)"),
    ({"attncc": 1}, {"lowering": None}, "has no lowering after the strategy pass"),
    ({"attncc": 1}, {"lowering": Lowering(())}, "lowering must be a Lowering of Path"),
    ({"attncc": 1}, {"lowering": Lowering((Path("sdpa", True, ""),))}, "with a reason each"),
    ({"attncc": 1}, {"lowering": Lowering((Path("a", True, "x"), Path("a", False, "y")))},
     "lists a path twice"),
])
def test_verify_checks_projection_and_lowering(spec, fields, message):
    verify(lower(spec))
    with pytest.raises(IRError, match=re.escape(message)):
        verify(_attention_replaced(lower(spec), **fields))
