"""The import graph among the modules of attncc and its built-in plugins has no cycle.

Every ``import`` statement counts, at module level or inside a function (a function-level import
hides a cycle, it does not remove it). ``from pkg import name`` is an edge to ``pkg.name`` when
that is a module, else to ``pkg`` (its ``__init__``). Importing ``pkg.sub`` runs ``pkg/__init__``
first, but that implicit edge is not counted; the rule that keeps the graph acyclic is that a
module never imports from the ``__init__`` of a package that imports it back.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[2]


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of attncc and of plugins/*."""
    plugins = ROOT / "plugins"
    files = [(ROOT, path) for path in (ROOT / "attncc").rglob("*.py")]
    files += [(plugins, path) for path in plugins.glob("*/**/*.py")]
    found = {}
    for base, path in sorted(files):
        parts = list(path.relative_to(base).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that module ``name`` (at ``path``) imports anywhere."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets.add(full if full in known else base)
    return {t for t in targets if t in known and t != name}


def import_graph() -> nx.DiGraph:
    found = modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(found)
    for name, path in found.items():
        graph.add_edges_from((name, target) for target in imported(name, path, set(found)))
    return graph


def test_the_graph_sees_module_and_function_level_and_relative_imports(tmp_path):
    graph = import_graph()
    assert graph.has_edge("attncc.api", "attncc.backends.config")  # module level
    assert graph.has_edge("attncc.api", "attncc.tuning.tuner")  # inside tune()
    known = {"pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c"}
    (tmp_path / "c.py").write_text("from .. import a\nfrom ..b import name\n"
                                   "def f():\n    from pkg.sub import c, other\n")
    assert imported("pkg.sub.c", tmp_path / "c.py", known) == {"pkg.a", "pkg.b", "pkg.sub"}


def test_attncc_imports_have_no_cycle():
    graph = import_graph()
    cycles = sorted(sorted(component) for component in nx.strongly_connected_components(graph)
                    if len(component) > 1)
    described = []
    for component in cycles:
        cycle = nx.find_cycle(graph.subgraph(component))
        described.append(" -> ".join([a for a, _ in cycle] + [cycle[0][0]]))
    assert not described, "import cycles:\n" + "\n".join(described)
