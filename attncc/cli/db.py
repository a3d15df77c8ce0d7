"""``attncc db``: list, show, export, import and clear tuning records."""

from __future__ import annotations

import json

import click

db_option = click.option("--db", default=None, metavar="PATH|URL",
                         help="Tuning database (default $ATTNCC_DB or ~/.cache/attncc/tuning.db).")


def _filters(command):
    command = click.option("--backend", default=None,
                           help="Only this backend (name, or name@version).")(command)
    return click.option("--spec", "spec", default=None, metavar="FILE|HASH",
                        help="Only records of this spec (a spec file or its hash).")(command)


def _open(db):
    from attncc.db.store import Store

    return Store(db)


def _spec_hash(spec: str | None) -> str | None:
    from pathlib import Path

    if spec is None or not Path(spec).is_file():
        return spec
    from attncc.cli.options import load

    return load(spec).hash


@click.group("db")
def db() -> None:
    """The tuning database: records keyed by spec, shape bucket, dtype, backend and target."""


@db.command("list")
@db_option
@_filters
@click.option("--shipped", is_flag=True, help="List the shipped tuning_db/*.jsonl records too.")
def list_(db, spec, backend, shipped) -> None:
    """One line per record: id, spec, bucket, dtype, backend, median time, config."""
    from attncc.db.exchange import shipped as shipped_records

    store = _open(db)
    rows = [("", r) for r in store.records(spec_hash=_spec_hash(spec), backend=backend)]
    if shipped:
        wanted = _spec_hash(spec)
        rows += [("shipped", r) for _, r in shipped_records()
                 if (wanted is None or r.key.spec_hash == wanted)
                 and (backend is None or r.key.backend == backend
                      or r.key.backend_name == backend)]
    if not rows:
        click.echo(f"no records in {store.display}" + (" or shipped" if shipped else ""))
        return
    for origin, r in rows:
        config = " ".join(f"{k}={v}" for k, v in r.config.items())
        click.echo(f"{r.id}  {r.spec_name:<20} {r.key.bucket:<14} {r.key.dtype:<9} "
                   f"{r.key.backend:<10} {r.median_s * 1e3:9.4g} ms  {config}"
                   + (f"  [{origin}]" if origin else ""))


@db.command("show")
@db_option
@click.argument("record_id", metavar="ID")
def show(db, record_id) -> None:
    """Every field of the record whose id starts with ID (as JSON)."""
    from attncc.db.key import DatabaseError

    found = _open(db).records(id_prefix=record_id)
    if len(found) != 1:
        raise DatabaseError(f"record id '{record_id}': expected exactly one match, got "
                            f"{len(found)}" + ("; see 'attncc db list'" if not found else
                                               "; give more characters"))
    click.echo(json.dumps(found[0].to_json(), indent=2, sort_keys=True))


@db.command("export")
@db_option
@_filters
@click.argument("path", metavar="FILE", type=click.Path(dir_okay=False, writable=True))
def export(db, spec, backend, path) -> None:
    """Write records to FILE as JSONL (one record per line, sorted by id)."""
    from attncc.db.exchange import export as write

    count = write(_open(db), path, spec_hash=_spec_hash(spec), backend=backend)
    click.echo(f"exported {count} record(s) to {path}")


@db.command("import")
@db_option
@click.option("--keep-existing", is_flag=True,
              help="Keep a stored record when the file has one with the same key.")
@click.argument("path", metavar="FILE", type=click.Path(exists=True, dir_okay=False))
def import_(db, keep_existing, path) -> None:
    """Read JSONL records from FILE into the database (the file is checked first)."""
    from attncc.db.exchange import import_ as read_into

    store = _open(db)
    written, skipped = read_into(store, path, replace=not keep_existing)
    click.echo(f"imported {written} record(s) into {store.display}"
               + (f", kept {skipped} existing" if skipped else ""))


@db.command("clear")
@db_option
@_filters
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def clear(db, spec, backend, yes) -> None:
    """Delete the records matching the filters (all of them without filters)."""
    store = _open(db)
    found = store.records(spec_hash=_spec_hash(spec), backend=backend)
    if not found:
        click.echo("nothing to clear")
        return
    if not yes:
        click.confirm(f"delete {len(found)} record(s) from {store.display}?", abort=True)
    click.echo(f"deleted {store.delete([r.id for r in found])} record(s)")
