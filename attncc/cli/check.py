"""``attncc check SPEC``: every installed backend against the float64 reference.

Each backend that loads and supports the spec runs on fresh random inputs (attncc.testing) and is
judged as the conformance suite judges it; a backend that cannot load or does not support the spec
is listed as skipped with the reason. The exit status is 1 when any backend disagrees.
"""

from __future__ import annotations

import click

from attncc.cli.options import each_backend, every_backend_options, lowered, random_call


@click.command("check")
@every_backend_options("Check", seq=128, batch=2)
@click.option("--grads/--no-grads", default=True, show_default=True,
              help="Also check gradients of backends that have a backward.")
@click.pass_context
def check(ctx: click.Context, spec: str, batch: int, seq: int, seq_k: int | None,
          heads: int | None, head_dim: int | None, dtype: str, backend_names: tuple[str, ...],
          target_name: str, seed: int, grads: bool) -> None:
    """Run every installed backend on SPEC and compare it with the float64 reference.

    Sizes the spec leaves open follow attncc.testing (kv_heads = heads / 2 when heads is even,
    so that grouped heads are covered). Exit status 1 when any backend disagrees.
    """
    from attncc.api import compile as compile_spec
    from attncc.testing import check_kernel

    loaded, target, graph = lowered(spec, batch, seq, seq_k, heads, head_dim, target_name)
    rows, sizes = [], None
    for name, backend, reason in each_backend(backend_names, graph, target):
        if backend is None:
            rows.append((name, "SKIP", reason, ()))
            continue
        q, k, v, inputs = random_call(loaded, backend.library, target,
                                      (batch, seq, seq_k or seq, heads, head_dim), dtype, seed)
        kernel = compile_spec(loaded, backend=name, target=target)
        report = check_kernel(kernel, loaded, q, k, v, inputs, grads=None if grads else False,
                              seed=seed)
        sizes = report.sizes
        rows.append((name, "PASS" if report.ok else "FAIL", "", report.checks))
    click.echo(f"{loaded.name}: {dtype}, target {target.key(1)}"
               + (", " + " ".join(f"{k}={v}" for k, v in sizes.items()) if sizes else ""))
    for line in table(rows):
        click.echo(line)
    if all(verdict == "SKIP" for _, verdict, _, _ in rows):
        click.echo("error: no backend could run this spec", err=True)
        ctx.exit(1)
    if any(verdict == "FAIL" for _, verdict, _, _ in rows):
        ctx.exit(1)


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
