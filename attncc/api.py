"""``attncc.compile``: spec -> IR -> passes -> backend -> Kernel, in one visible sequence."""

from __future__ import annotations

from attncc.backends import registry
from attncc.backends.base import Backend, Kernel
from attncc.errors import BackendError
from attncc.passes.pipeline import lower
from attncc.spec.load import load_spec


def compile(spec, backend: str = "auto", *, target=None, config: dict | None = None) -> Kernel:
    """Compile ``spec`` (anything ``load_spec`` takes) into a callable Kernel.

    ``backend`` names a registered backend or is ``"auto"``: the supported backend with the highest
    ``priority`` for the target; ``kernel.selection`` says which was chosen and why. ``config``
    overrides the backend's default tile parameters; unknown names, or a config the backend's
    ``keep()`` filter rejects for this target, raise BackendError. ``target`` defaults to this
    machine's CPU fingerprint.
    """
    from attncc.target import default_target

    spec = load_spec(spec)
    graph = lower(spec)
    target = target or default_target()
    chosen, selection = _choose(backend, graph, target)
    full_config = {**chosen.default_config(graph, target), **_checked(chosen, graph, target,
                                                                      config)}
    kernel = chosen.compile(graph, full_config, target)
    kernel.selection = selection
    return kernel


def _choose(name: str, graph, target) -> tuple[Backend, str]:
    if name != "auto":
        backend = registry.get(name)
        support = backend.supports(graph, target)
        if not support:
            raise BackendError(f"backend '{name}' cannot run '{graph.graph['spec'].name}': "
                               f"{support.reason}")
        return backend, f"{name} (asked for)"
    candidates, refused = [], []
    for backend_name, backend in registry.available().items():
        if isinstance(backend, BackendError):
            refused.append(f"{backend_name}: {backend}")
            continue
        support = backend.supports(graph, target)
        if support:
            candidates.append(backend)
        else:
            refused.append(f"{backend_name}: {support.reason}")
    if not candidates:
        raise BackendError(f"no installed backend can run '{graph.graph['spec'].name}': "
                           + "; ".join(refused))
    best = max(candidates, key=lambda b: (b.priority(target), b.name))
    others = ", ".join(b.name for b in candidates if b is not best) or "none"
    return best, f"{best.name} (auto: highest priority on this target; also supported: {others})"


def _checked(backend: Backend, graph, target, config: dict | None) -> dict:
    if not config:
        return {}
    space = backend.search_space(graph, target)
    unknown = sorted(set(config) - set(space.params))
    if unknown:
        raise BackendError(f"unknown tunable '{unknown[0]}' for backend '{backend.name}'; "
                           f"expected: {', '.join(space.params)}")
    merged = {**backend.default_config(graph, target), **config}
    if not space.keep(merged):
        raise BackendError(f"config {config} does not fit backend '{backend.name}' on this "
                           "target (rejected by its keep() filter)")
    return config
