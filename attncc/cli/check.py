"""``attncc check SPEC``: every installed backend against the float64 reference.

Each backend that loads and supports the spec runs on fresh random inputs (attncc.testing) and is
judged as the conformance suite judges it; a backend that cannot load or does not support the spec
is listed as skipped with the reason. The exit status is 1 when any backend disagrees.
"""

from __future__ import annotations

import click

from attncc.cli.options import (
    checked_backends,
    detect_target,
    dtype_option,
    load,
    resolve_sizes,
    size_options,
    spec_argument,
    target_option,
)


@click.command("check")
@spec_argument
@size_options(seq=128, batch=2)
@dtype_option()
@click.option("--backend", "backend_names", multiple=True, metavar="NAME",
              help="Check only this backend (repeatable); default: every installed one.")
@target_option
@click.option("--grads/--no-grads", default=True, show_default=True,
              help="Also check gradients of backends that have a backward.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the inputs.")
@click.pass_context
def check(ctx: click.Context, spec: str, batch: int, seq: int, seq_k: int | None,
          heads: int | None, head_dim: int | None, dtype: str, backend_names: tuple[str, ...],
          target_name: str, grads: bool, seed: int) -> None:
    """Run every installed backend on SPEC and compare it with the float64 reference.

    Sizes the spec leaves open follow attncc.testing (kv_heads = heads / 2 when heads is even,
    so that grouped heads are covered). Exit status 1 when any backend disagrees.
    """
    from attncc.backends import registry
    from attncc.errors import BackendError
    from attncc.passes.pipeline import lower

    loaded = load(spec)
    resolve_sizes(loaded, batch, seq, seq_k, heads, head_dim)  # rejects options the spec fixes
    target = detect_target(target_name)
    graph = lower(loaded)
    names = checked_backends(backend_names)
    rows, failed, sizes = [], False, None
    for name in names:
        try:
            backend = registry.get(name)
        except BackendError as err:
            rows.append((name, "SKIP", str(err), ()))
            continue
        support = backend.supports(graph, target)
        if not support:
            rows.append((name, "SKIP", support.reason, ()))
            continue
        report = run_one(loaded, backend, target, (batch, seq, seq_k or seq, heads, head_dim),
                         dtype, seed, grads)
        sizes = report.sizes
        failed = failed or not report.ok
        rows.append((name, "PASS" if report.ok else "FAIL", "", report.checks))
    click.echo(f"{loaded.name}: {dtype}, target {target.key(1)}"
               + (", " + " ".join(f"{k}={v}" for k, v in sizes.items()) if sizes else ""))
    for line in table(rows):
        click.echo(line)
    if not any(verdict != "SKIP" for _, verdict, _, _ in rows):
        click.echo("error: no backend could run this spec", err=True)
        ctx.exit(1)
    if failed:
        ctx.exit(1)


def run_one(spec, backend, target, shape: tuple, dtype: str, seed: int, grads: bool):
    """The attncc.testing Report of ``backend`` on ``spec`` with fresh random inputs."""
    from attncc.api import compile as compile_spec
    from attncc.testing import check_kernel, random_inputs

    batch, seq_q, seq_k, heads, head_dim = shape
    library = backend.library
    device = "cuda" if target.kind == "cuda" else None
    q, k, v, inputs = random_inputs(spec, batch, seq_q, seq_k, dtype, seed, library, device,
                                    heads=heads, head_dim=head_dim)
    kernel = compile_spec(spec, backend=backend.name, target=target)
    return check_kernel(kernel, spec, q, k, v, inputs, grads=None if grads else False,
                        seed=seed)


def table(rows: list) -> list[str]:
    """One line per checked quantity (error, eager error, bound) and per skipped backend."""
    width = max([len(name) for name, *_ in rows] + [7])
    lines = [f"{'backend':<{width}}  {'result':<6}  {'quantity':<10} {'error':>10} "
             f"{'eager':>10} {'bound':>10}"]
    for name, verdict, reason, checks in rows:
        if not checks:
            lines.append(f"{name:<{width}}  {verdict:<6}  {reason}")
        for i, c in enumerate(checks):
            lines.append(f"{name if i == 0 else '':<{width}}  {verdict if i == 0 else '':<6}  "
                         f"{c.quantity:<10} {c.error:10.3e} {c.eager_error:10.3e} "
                         f"{c.bound:10.3e}{'' if c.ok else '  FAIL'}")
    return lines
