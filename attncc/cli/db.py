"""``attncc db``: list, show, export, import and clear tuning records.

``--db`` opens the ``Store`` and ``--spec`` (a spec file or a hash) becomes a spec hash as the
options are parsed, so each command receives a store and the filters ``Store.records`` takes.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from attncc.cli.options import load, stacked


def _store(ctx, param, db):
    from attncc.db.store import Store

    return Store(db)


def _spec_hash(ctx, param, spec: str | None) -> str | None:
    if spec is None or not Path(spec).is_file():
        return spec
    return load(spec).hash


db_option = click.option("--db", "store", default=None, metavar="PATH|URL", callback=_store,
                         help="Tuning database (default $ATTNCC_DB or ~/.cache/attncc/tuning.db).")


_filters = stacked(
    click.option("--spec", "spec_hash", default=None, metavar="FILE|HASH", callback=_spec_hash,
                 help="Only records of this spec (a spec file or its hash)."),
    click.option("--backend", default=None, help="Only this backend (name, or name@version)."))


@click.group("db")
def db() -> None:
    """The tuning database: records keyed by spec, shape bucket, dtype, backend and target."""


@db.command("list")
@db_option
@_filters
@click.option("--shipped", is_flag=True, help="List the shipped tuning_db/*.jsonl records too.")
def list_(store, spec_hash, backend, shipped) -> None:
    """One line per record: id, spec, bucket, dtype, backend, median time, how it matches this
    machine (exact, verified here, fallback: versions or arch, other device), what it was tuned
    on (device, cores, date), config."""
    from attncc.db.exchange import shipped as shipped_records

    rows = [("", r) for r in store.records(spec_hash=spec_hash, backend=backend)]
    if shipped:
        rows += [("shipped", r) for _, r in shipped_records()
                 if spec_hash in (None, r.key.spec_hash)
                 and backend in (None, r.key.backend, r.key.backend_name)]
    if not rows:
        click.echo(f"no records in {store.display}" + (" or shipped" if shipped else ""))
        return
    for origin, r in rows:
        config = " ".join(f"{k}={v}" for k, v in r.config.items())
        click.echo(f"{r.id}  {r.spec_name:<20} {r.key.bucket:<14} {r.key.dtype:<9} "
                   f"{r.key.backend:<10} {r.median_s * 1e3:9.4g} ms  {_match(r):<18} "
                   f"{_tuned_on(r):<28} {config}" + (f"  [{origin}]" if origin else ""))


_MATCH = {3: "exact", 2: "fallback:versions", 1: "fallback:arch", 0: "other device"}


def _match(record) -> str:
    """How ``record`` matches this machine's target of its kind (``Target.nearest``)."""
    from attncc.errors import AttnccError
    from attncc.target import Target, default_target

    if record.verified:
        return "verified here"
    try:
        here = default_target(record.fingerprint.get("kind"))
        return _MATCH[here.nearest([Target.from_dict(record.fingerprint)])[1]]
    except (AttnccError, ImportError, RuntimeError, KeyError, TypeError):
        return "other device"


def _tuned_on(record) -> str:
    """The device and core count the record was tuned on, and the date."""
    target = record.key.target.split("/", 1)[0]
    return f"{target.split(':', 1)[-1]} {record.updated[:10]}"


@db.command("show")
@db_option
@click.argument("record_id", metavar="ID")
def show(store, record_id) -> None:
    """Every field of the record whose id starts with ID (as JSON)."""
    from attncc.db.key import DatabaseError

    found = store.records(id_prefix=record_id)
    if len(found) != 1:
        raise DatabaseError(f"record id '{record_id}': expected exactly one match, got "
                            f"{len(found)}" + ("; see 'attncc db list'" if not found else
                                               "; give more characters"))
    click.echo(json.dumps(found[0].to_json(), indent=2, sort_keys=True))


@db.command("export")
@db_option
@_filters
@click.argument("path", metavar="FILE", type=click.Path(dir_okay=False, writable=True))
def export(store, spec_hash, backend, path) -> None:
    """Write records to FILE as JSONL (one record per line, sorted by id)."""
    from attncc.db.exchange import export as write

    count = write(store, path, spec_hash=spec_hash, backend=backend)
    click.echo(f"exported {count} record(s) to {path}")


@db.command("import")
@db_option
@click.option("--keep-existing", is_flag=True,
              help="Keep a stored record when the file has one with the same key.")
@click.argument("path", metavar="FILE", type=click.Path(exists=True, dir_okay=False))
def import_(store, keep_existing, path) -> None:
    """Read JSONL records from FILE into the database (the file is checked first)."""
    from attncc.db.exchange import import_ as read_into

    written, skipped = read_into(store, path, replace=not keep_existing)
    click.echo(f"imported {written} record(s) into {store.display}"
               + (f", kept {skipped} existing" if skipped else ""))


@db.command("clear")
@db_option
@_filters
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def clear(store, spec_hash, backend, yes) -> None:
    """Delete the records matching the filters (all of them without filters)."""
    found = store.records(spec_hash=spec_hash, backend=backend)
    if not found:
        click.echo("nothing to clear")
        return
    if not yes:
        click.confirm(f"delete {len(found)} record(s) from {store.display}?", abort=True)
    click.echo(f"deleted {store.delete([r.id for r in found])} record(s)")
