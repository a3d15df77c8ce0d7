"""The two entry points: ``compile`` (spec -> IR -> passes -> backend -> tuning record -> Kernel)
and ``tune`` (search a backend's tile parameters, store the winner)."""

from __future__ import annotations

import warnings

from attncc.backends import registry
from attncc.backends.base import Backend, Kernel
from attncc.backends.config import full_config
from attncc.db.key import Record
from attncc.db.lookup import lookup
from attncc.errors import AttnccError, BackendError, InputError
from attncc.passes.pipeline import lower
from attncc.spec.load import load_spec


def compile(spec, backend: str = "auto", *, target=None, config: dict | None = None,
            tune: bool = False, seq: int | None = None, seq_k: int | None = None, batch: int = 1,
            dtype: str = "float32", db=None) -> Kernel:
    """Compile ``spec`` (anything ``load_spec`` takes) into a callable Kernel.

    Order: an explicit ``config`` wins; else the tuning database is looked up (no benchmarking:
    the user's database at ``db``/``$ATTNCC_DB``, then the shipped ``tuning_db/`` records; the
    shape bucket of ``seq``/``seq_k`` when given, else the newest record of any bucket); on a
    miss, ``tune=True`` tunes for ``(batch, seq, seq_k, dtype)`` and stores the winner, otherwise
    the backend's default config is used. ``kernel.record`` is the record used (None for
    defaults) and ``kernel.selection`` says in words which backend and config were chosen, why.

    ``backend`` names a registered backend or is ``"auto"``: when every supported backend has a
    tuning record, the one whose record is fastest; else the highest ``priority`` for the target.
    Unknown config names, or a config the backend's search space does not accept on this target,
    raise BackendError. ``dtype`` also tells the backend which element size a config must fit
    (``graph.graph["dtype"]``: shared memory and registers scale with it); a kernel checked for
    float32 fits the half types too.
    """
    from attncc.target import default_target

    spec = load_spec(spec)
    graph = lower(spec)
    graph.graph["dtype"] = dtype
    target = target or default_target()
    candidates = _supported(backend, graph, target)
    records = {} if config else {b.name: _lookup(spec, b, seq, seq_k, dtype, target, db)
                                 for b in candidates}
    chosen, why = _choose(candidates, records, target)
    record = records.get(chosen.name)
    if config:
        source = "the config passed in"
    elif record is not None:
        config, source = record.config, f"tuning record {record.id} ({record.note}; " \
                                         f"{record.origin})"
    elif tune:
        record = tune(spec, chosen.name, batch=batch, seq=seq or 1024, seq_k=seq_k,
                           dtype=dtype, db=db, target=target)
        config, source = record.config, f"freshly tuned record {record.id}"
    else:
        source = "the backend's default config (no tuning record for this spec, backend and target)"
    try:
        full = full_config(chosen, graph, target, config)
    except BackendError as err:
        if record is None:
            raise
        warnings.warn(f"attncc: tuning record {record.id} not used: {err}", stacklevel=2)
        record, full = None, chosen.default_config(graph, target)
        source = "the backend's default config (the tuning record's config does not fit)"
    kernel = chosen.compile(graph, full, target)
    kernel.record = record
    kernel.selection = f"backend {chosen.name} ({why}); config from {source}"
    return kernel


def _supported(name: str, graph, target) -> list[Backend]:
    spec_name = graph.graph["spec"].name
    if name != "auto":
        backend = registry.get(name)
        support = backend.supports(graph, target)
        if not support:
            raise BackendError(f"backend '{name}' cannot run '{spec_name}': {support.reason}")
        return [backend]
    found, refused = [], []
    for backend_name, backend in registry.available().items():
        if isinstance(backend, BackendError):  # not loadable
            refused.append(f"{backend_name}: {backend}")
        elif support := backend.supports(graph, target):
            found.append(backend)
        else:
            refused.append(f"{backend_name}: {support.reason}")
    if not found:
        raise BackendError(f"no installed backend can run '{spec_name}': " + "; ".join(refused))
    return found


def _choose(candidates: list[Backend], records: dict, target) -> tuple[Backend, str]:
    if len(candidates) == 1:
        return candidates[0], "asked for"
    if all(records.get(b.name) is not None for b in candidates):
        best = min(candidates, key=lambda b: records[b.name].median_s)
        return best, "auto: fastest tuning record on this target"
    best = max(candidates, key=lambda b: (b.priority(target), b.name))
    others = ", ".join(b.name for b in candidates if b is not best)
    return best, f"auto: no tuning records, highest priority on this target; also: {others}"


def _lookup(spec, backend: Backend, seq, seq_k, dtype, target, db):
    """The tuning record for this compile, or None; a database that cannot be read only warns."""
    sizes = None if seq is None else (seq, seq_k or seq)
    try:
        return lookup(spec, backend, sizes, dtype, target, db)
    except AttnccError as err:
        warnings.warn(f"attncc: tuning database not used: {err}", stacklevel=3)
        return None


def tune(spec, backend: str | Backend = "numpy", *, batch: int = 1, seq: int = 1024,
         seq_k: int | None = None, dtype: str = "float32", trials: int = 40, workers: int = 1,
         db=None, storage: str | None = None, plot_dir=None, target=None,
         seed: int | None = None, progress: bool = True, timer=None, heartbeat: int = 30,
         sampler: str = "tpe", guide: bool = True) -> Record:
    """Tune ``backend``'s tile parameters for ``spec`` at ``(batch, seq, seq_k)`` and ``dtype``.

    Needs the ``tune`` extra (Optuna, SQLAlchemy). ``trials`` configs are measured (at most the
    number of valid ones); with ``workers > 1`` that many processes share the study (``backend``
    must then be a registered name). ``db`` is the record database (a path, URL or ``Store``;
    default ``$ATTNCC_DB``, then ``~/.cache/attncc/tuning.db``); ``storage`` the Optuna storage
    URL (default: beside ``db``, ``attncc.db.store.study_storage``); ``plot_dir`` gets the
    optimization-history and parameter-importance PNGs. ``target`` is a ``Target``, a device name
    (``"cpu"``, ``"cuda"``) or None for this CPU. ``timer(kernel, (q, k, v, inputs), repeat) ->
    Timing`` replaces the wall-clock measurement; ``heartbeat`` is the seconds between trial
    heartbeats (a trial silent for twice as long is failed); ``sampler`` is ``tpe``, ``gp`` or
    ``random``; ``guide`` lets the plan-based cost model propose every other trial.
    Returns the stored Record. Raises InputError for bad arguments, BackendError when no config
    runs, DatabaseError when the database cannot be used.
    """
    from attncc.target import default_target
    from attncc.tuning.tuner import Problem, search

    if trials < 1 or workers < 1:
        raise InputError(f"tune: expected trials >= 1 and workers >= 1, got trials={trials}, "
                         f"workers={workers}")
    if workers > 1 and not isinstance(backend, str):
        raise InputError("tune: workers > 1 needs the backend by its registered name")
    spec = load_spec(spec)
    chosen = registry.get(backend) if isinstance(backend, str) else backend
    if target is None or isinstance(target, str):
        target = default_target(target)
    problem = Problem(spec, chosen, target, batch, seq, seq_k or seq, dtype, timer)
    return search(problem, db, trials=trials, workers=workers, storage=storage, seed=seed,
                  heartbeat=heartbeat, sampler=sampler, guide=guide, progress=progress,
                  plot_dir=plot_dir)
