"""One check shared by the op tests: a model calling an attncc library op compiles with
``torch.compile(fullgraph=True)`` into one graph holding the op, and gives the eager values and
gradients."""

from __future__ import annotations

import torch


def assert_fullgraph_matches_eager(model, fn, leaves, q, k, v, inputs: dict) -> None:
    """``leaves``: the tensors whose gradients are compared (they must require grad)."""
    explain = torch._dynamo.explain(model)(q, k, v, **inputs)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    targets = {str(n.target) for g in explain.graphs for n in g.graph.nodes}
    assert f"attncc.{fn.op._qualname.split('::')[1]}.default" in targets
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v, **inputs)
    got.sum().backward()
    grads = [x.grad.clone() for x in leaves]
    for x in leaves:
        x.grad = None
    want = model(q, k, v, **inputs)
    want.sum().backward()
    torch.testing.assert_close(got, want)
    for g, x in zip(grads, leaves, strict=True):
        torch.testing.assert_close(g, x.grad)
