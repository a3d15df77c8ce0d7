"""``attncc target``: this machine's hardware fingerprint (attncc.target)."""

from __future__ import annotations

import json

import click

from attncc.cli.options import detect_target, target_option


@click.command("target")
@target_option
@click.option("--json", "as_json", is_flag=True, help="Print the fingerprint as JSON.")
@click.option("--layers", type=click.IntRange(1, 3), default=None,
              help="Print only the key of the first N layers.")
def target(target_name: str, as_json: bool, layers: int | None) -> None:
    """Print the hardware fingerprint that tuning records are keyed by."""
    found = detect_target(target_name)
    if as_json:
        click.echo(json.dumps({**found.to_dict(), "key": found.key()}, indent=2))
    elif layers is not None:
        click.echo(found.key(layers))
    else:
        click.echo(found.describe())
