"""The one check of a config against a backend's search space.

``attncc.compile`` and every backend's ``compile`` call ``full_config``: a config names only
tunables, sets each to a value the search space lists, and the merged config must pass
``SearchSpace.accepts``. Every config of ``search_space(...).configs()`` passes (the tuner and the
tests compile those directly).
"""

from __future__ import annotations

from attncc.errors import BackendError


def full_config(backend, graph, target, config: dict | None = None, *,
                why: str = "rejected by its search space") -> dict:
    """``backend.default_config(graph, target)`` updated with ``config``, checked.

    Raises BackendError when a name in ``config`` is not a tunable of
    ``backend.search_space(graph, target)``, when a value is not one the space lists (compared
    with its type: ``"64"`` is not ``64``), or when the space does not ``accept`` the merged
    config; ``why`` is the backend's explanation of such a rejection, in words.
    """
    space = backend.search_space(graph, target)
    config = config or {}
    for name, value in config.items():
        if name not in space.params:
            raise BackendError(f"unknown tunable '{name}' for backend '{backend.name}'; "
                               f"expected: {', '.join(space.params) or 'none'}")
        allowed = space.params[name]
        if not any(value == a and type(value) is type(a) for a in allowed):
            raise BackendError(f"config {name}={value!r} is not a value backend "
                               f"'{backend.name}' offers; expected one of "
                               f"{', '.join(map(repr, allowed))}")
    full = {**backend.default_config(graph, target), **config}
    if not space.accepts(full):
        dtype = graph.graph.get("dtype") or "float32"
        raise BackendError(f"backend '{backend.name}': config {full} cannot run for {dtype} on "
                           f"this target ({why})")
    return full
