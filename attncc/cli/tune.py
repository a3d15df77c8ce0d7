"""``attncc tune``: search a backend's tile parameters with Optuna and store the winner."""

from __future__ import annotations

import click

from attncc.api import EFFORTS
from attncc.cli.options import DTYPES, detect_target, load, spec_argument, target_option

_UNITS = {"s": 1, "m": 60, "h": 3600}


def _seconds(ctx, param, text: str | None) -> float | None:
    """``60s``, ``5m``, ``1h`` or plain seconds as a float; a usage error otherwise."""
    if text is None:
        return None
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        value = -1.0
    if not value > 0:
        raise click.BadParameter(f"expected a positive time like 60s, 5m or 1h, got {text!r}")
    return value


@click.command("tune")
@spec_argument
@click.option("--backend", default="numpy", show_default=True, help="Backend to tune.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Batch size.")
@click.option("--seq", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Query length (seq_q); the record covers its power-of-two bucket.")
@click.option("--seq-k", type=click.IntRange(min=1), default=None,
              help="Key length (seq_k); default: --seq.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True)
@click.option("--heads", type=click.IntRange(min=1), default=None,
              help="Query heads of the timed inputs (default: the spec's, else 4).")
@click.option("--trials", type=click.IntRange(min=1), default=None,
              help="Configs to measure (at most the number of valid ones; default: --effort's).")
@click.option("--budget", "budget", default=None, metavar="TIME", callback=_seconds,
              help="Stop after this long (60s, 5m, 1h; default: --effort's).")
@click.option("--effort", type=click.Choice(sorted(EFFORTS)), default="standard",
              show_default=True,
              help="Preset budget: quick (12 configs, 60 s), standard (40), full (200).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes on the one study.")
@click.option("--db", default=None, metavar="PATH|URL",
              help="Tuning database (default $ATTNCC_DB or ~/.cache/attncc/tuning.db).")
@click.option("--storage", default=None, metavar="URL",
              help="Optuna storage URL (default: beside --db, or the same PostgreSQL database).")
@click.option("--plot", "plot_dir", default=None, metavar="DIR",
              help="Write optimization-history and parameter-importance PNGs here.")
@click.option("--seed", type=int, default=None, help="Sampler seed.")
@click.option("--sampler", type=click.Choice(["tpe", "gp", "random"]), default="tpe",
              show_default=True, help="Optuna sampler (gp: fewer trials on small spaces).")
@click.option("--guide/--no-guide", default=True, show_default=True,
              help="Let the plan-based cost model propose every other trial.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@target_option
def tune(spec: str, backend: str, batch: int, seq: int, seq_k: int | None, dtype: str,
         heads: int | None, trials: int | None, budget: float | None, effort: str,
         workers: int, db: str | None, storage: str | None, plot_dir: str | None,
         seed: int | None, sampler: str, guide: bool, quiet: bool, target_name: str) -> None:
    """Tune SPEC's tile parameters for one shape bucket and store the fastest config.

    The bucket is timed at its upper bound (--seq 3000 runs at 4096) with --batch and --heads."""
    from attncc.api import tune as run_tune
    from attncc.db.store import Store

    loaded = load(spec)
    store = Store(db)
    record = run_tune(loaded, backend, batch=batch, seq=seq, seq_k=seq_k, dtype=dtype,
                      trials=trials, budget_s=budget, effort=effort, heads=heads,
                      workers=workers, db=store, storage=storage,
                      plot_dir=plot_dir, target=detect_target(target_name), seed=seed,
                      progress=not quiet, sampler=sampler, guide=guide)
    config = " ".join(f"{name}={value}" for name, value in record.config.items()) or "(none)"
    click.echo(f"{record.spec_name} on {record.key.backend}, {record.key.bucket} {dtype}: "
               f"{config}")
    click.echo(f"  {record.median_s * 1e3:.4g} ms median (IQR {record.spread_s * 1e3:.3g} ms), "
               f"{record.trials} configs measured, study {record.study}")
    click.echo(f"  {record.note}")
    click.echo(f"  stored as record {record.id} in {store.display}")
    if plot_dir:
        click.echo(f"  plots in {plot_dir}")
