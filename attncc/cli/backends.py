"""``attncc backends``: every registered backend, its version, or why it cannot load."""

from __future__ import annotations

import click


@click.command("backends")
def backends() -> None:
    """List the registered backends: loadable with their version, or the reason they are not."""
    from attncc.backends import registry
    from attncc.errors import BackendError

    found = registry.available()
    if not found:
        click.echo("no backends registered (entry-point group 'attncc.backends')")
        return
    width = max(len(name) for name in found)
    for name, backend in found.items():
        if isinstance(backend, BackendError):
            click.echo(f"{name:<{width}}  unavailable  {backend}")
        else:
            origin = f"{type(backend).__module__}.{type(backend).__qualname__}"
            click.echo(f"{name:<{width}}  ok  version {backend.version}  ({origin})")
