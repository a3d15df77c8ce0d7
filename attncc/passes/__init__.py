"""[3] The passes over the IR, one per file; ``pipeline.PIPELINE`` lists them in order.

Each pass is a frozen dataclass with a ``name`` and ``apply(graph) -> graph`` that returns a new
graph (recorded in ``graph.graph["passes"]``) and leaves its argument untouched.
"""
