"""Finding backends: the ``attncc.backends`` entry-point group, built-in ones included.

A plugin package declares ``[project.entry-points."attncc.backends"] NAME = "module:BackendClass"``;
attncc knows no backend by name. Two entry points with one name are an error; a plugin that fails
to load (its dependency missing) is listed as unavailable with the reason. The entry points are
read once per process; ``refresh()`` reads them again (a plugin installed since).
"""

from __future__ import annotations

import importlib
from functools import cache
from importlib.metadata import entry_points

from attncc.backends.base import Backend
from attncc.errors import BackendError

GROUP = "attncc.backends"


@cache
def _entry_points() -> dict:
    found: dict = {}
    for ep in entry_points(group=GROUP):
        if ep.name in found and found[ep.name].value != ep.value:
            raise BackendError(f"two backends are registered as '{ep.name}': "
                               f"{found[ep.name].value} and {ep.value}")
        found[ep.name] = ep
    return found


def names() -> list[str]:
    """Names of every registered backend, loadable or not, sorted."""
    return sorted(_entry_points())


@cache
def _load(name: str) -> Backend:
    ep = _entry_points()[name]
    try:
        cls = ep.load()
    except Exception as err:
        raise BackendError(f"backend '{name}' ({ep.value}) cannot be loaded: "
                           f"{type(err).__name__}: {err}") from None
    backend = cls()
    if not isinstance(backend, Backend):
        raise BackendError(f"backend '{name}' ({ep.value}) is not an attncc Backend")
    return backend


def get(name: str) -> Backend:
    """The backend registered as ``name``; BackendError if unknown or not loadable."""
    if name not in _entry_points():
        raise BackendError(f"unknown backend '{name}'; installed: {', '.join(names()) or 'none'}")
    return _load(name)


def available() -> dict[str, Backend | BackendError]:
    """Every registered backend, or the error that keeps it from loading."""
    result: dict = {}
    for name in names():
        try:
            result[name] = get(name)
        except BackendError as err:
            result[name] = err
    return result


def refresh() -> None:
    """Forget the entry points and loaded backends read so far; the next call reads them again
    (import caches invalidated, so distributions added to ``sys.path`` since are found)."""
    importlib.invalidate_caches()
    _entry_points.cache_clear()
    _load.cache_clear()
