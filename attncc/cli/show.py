"""``attncc show SPEC``: the IR after the pipeline, its lowering paths, the block plan, the cost,
and the inputs."""

from __future__ import annotations

import click
import sympy

from attncc.cli.options import (
    block_options,
    dtype_option,
    load,
    resolve_sizes,
    size_options,
    spec_argument,
)


@click.command("show")
@spec_argument
@size_options(seq=4096)
@block_options
@dtype_option
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the random inputs a data-dependent mask is classified from.")
def show(spec: str, batch: int, seq: int, seq_k: int | None, heads: int | None,
         head_dim: int | None, block_m: int, block_n: int, dtype: str, seed: int) -> None:
    """Print the lowered IR, lowering paths, block plan and density, FLOPs and bytes, and the
    inputs of SPEC."""
    from attncc.ir.printer import print_graph
    from attncc.passes.cost import DTYPE_BYTES, evaluate_cost

    loaded = load(spec)
    sizes = resolve_sizes(loaded, batch, seq, seq_k, heads, head_dim)
    graph, node, plan, data = lowered_plan(loaded, sizes, block_m, block_n, seed)
    density = float(plan.block_density()) if plan is not None else 1.0

    click.echo(f"spec: {loaded.name}  (hash {loaded.hash})" + (f"  {loaded.doc}" if loaded.doc
                                                              else ""))
    click.echo("sizes: " + " ".join(f"{name}={value}" for name, value in sizes.items()))
    click.echo("\n== IR ==")
    click.echo(print_graph(graph), nl=False)
    click.echo(f"\n== lowering of the {node.op_name} node (strategy pass) ==")
    width = max(len(p.name) for p in node.lowering.paths)
    for p in node.lowering.paths:
        click.echo(f"{p.name:<{width}}  {'yes' if p.ok else 'no ':<3}  {p.why}")
    click.echo(f"\n== block plan (block_m={block_m}, block_n={block_n}) ==")
    if plan is None:
        click.echo(f"block density: n/a ({node.op_name} has no block plan; it lowers by the "
                   f"{' / '.join(p.name for p in node.lowering.paths)} path)")
    else:
        for line in plan_summary(plan, data is not None, seed):
            click.echo(line)
    click.echo(f"\n== cost at these sizes (density = block density, itemsize = "
               f"{DTYPE_BYTES[dtype]} for {dtype}) ==")
    values = evaluate_cost(graph, sizes, density, itemsize=DTYPE_BYTES[dtype])
    for name, formula in graph.graph.get("cost", {}).items():
        click.echo(f"{name} = {formula}")
        if name in values:
            click.echo(f"{' ' * len(name)} = {_number(values[name])}")
    if "intensity" in values:
        click.echo(f"intensity (flops/byte) = {_number(values['intensity'])}")
    click.echo("\n== inputs ==")
    for line in input_lines(loaded, sizes):
        click.echo(line)


def lowered_plan(spec, sizes: dict[str, int], block_m: int, block_n: int, seed: int):
    """``(graph, attention node, block plan or None, mask inputs or None)`` of ``spec``: the
    pipeline's graph, and the plan ``attncc.plan.build_plan`` makes of its FusedAttention node
    (None for a node without one), on random inputs (``seed``) where the mask reads inputs."""
    from attncc.ir.graph import FusedAttention, attention_node
    from attncc.passes.pipeline import lower
    from attncc.plan import build_plan

    graph = lower(spec)
    _, node = attention_node(graph)
    if not isinstance(node, FusedAttention):
        return graph, node, None, None
    data = plan_inputs(spec, node, sizes, seed)
    return graph, node, build_plan(node, sizes, block_m, block_n, data), data


def plan_summary(plan, random_data: bool, seed: int) -> list[str]:
    """Block counts per state and the block density, one fact per line."""
    batch, heads, n_q, n_k = plan.states.shape
    shared = (f"{'per batch' if batch > 1 else 'shared over batch'}, "
              f"{'per head' if heads > 1 else 'shared over heads'}")
    lines = [f"seq_q={plan.seq_q} seq_k={plan.seq_k}: {n_q} query blocks x {n_k} key blocks "
             f"({shared})"]
    for label, count in plan.counts().items():
        lines.append(f"{label:<8}{count:>10}  ({100 * count / plan.states.size:.1f}% of blocks)")
    lines.append(f"block density: {float(plan.block_density()):.4f}")
    if random_data:
        lines.append(f"(the mask reads inputs: classified on random inputs, seed {seed})")
    return lines


def input_lines(spec, sizes: dict[str, int]) -> list[str]:
    """q, k, v and each named input: symbolic shape, shape at ``sizes``, dtype."""
    from attncc.spec.symbols import SIZES, TENSORS

    subs = {SIZES[name]: value for name, value in sizes.items()}
    rows = [(name, shape, "float") for name, shape in TENSORS.items()]
    rows += [(name, decl.shape, decl.dtype + (" (implied)" if decl.implied else ""))
             for name, decl in spec.inputs.items()]
    width = max(len(name) for name, _, _ in rows)
    lines = []
    for name, shape, dtype in rows:
        symbolic = "[" + ", ".join(str(d) for d in shape) + "]"
        concrete = str(tuple(int(sympy.sympify(d).subs(subs)) for d in shape))
        lines.append(f"{name:<{width}}  {symbolic} = {concrete}  {dtype}")
    return lines


def plan_inputs(spec, node, sizes: dict[str, int], seed: int) -> dict | None:
    """Random values (NumPy) of the spec's named inputs at ``sizes`` for the block plan.

    Only a mask that reads inputs (document ids; the ``masks`` pass's ``reads_inputs`` of the
    fused ``node``) needs them, to classify its blocks; None for every other node.
    """
    if getattr(node, "mask", None) is None or not node.mask.reads_inputs:
        return None
    from attncc.testing import random_inputs

    *_, inputs = random_inputs(spec, sizes["batch"], sizes["seq_q"], sizes["seq_k"], "float32",
                               seed, "numpy", heads=sizes["heads"], head_dim=sizes["head_dim"])
    return inputs


def _number(value) -> str:
    value = float(value)
    return f"{value:.6g}" if abs(value) < 1e6 else f"{value:.4e}"
