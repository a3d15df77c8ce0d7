"""The two entry points: ``compile`` (spec -> IR -> passes -> backend -> tuning record -> Kernel)
and ``tune`` (search a backend's tile parameters, store the winner)."""

from __future__ import annotations

from attncc.backends import registry
from attncc.backends.base import Backend, Kernel
from attncc.backends.config import full_config
from attncc.db.key import Key, Record, bucket_of, upper_bound
from attncc.db.lookup import find_or_warn, open_or_warn
from attncc.errors import BackendError, InputError
from attncc.passes.pipeline import lower
from attncc.spec.load import load_spec


def compile(spec, backend: str = "auto", *, target=None, config: dict | None = None,
            tune: bool | str = False, seq: int | None = None, seq_k: int | None = None,
            batch: int = 1, dtype: str = "float32", db=None) -> Kernel:
    """Compile ``spec`` (anything ``load_spec`` takes) into a callable Kernel.

    An explicit ``config`` pins one config for every call (``kernel.records`` is empty).
    Otherwise the kernel dispatches per call (``attncc.tuning.dispatch``): each call's shape
    bucket and dtype are looked up in the tuning database the first time they are seen (no
    benchmarking: the user's database at ``db``/``$ATTNCC_DB``, then the shipped ``tuning_db/``
    records), the variant for that record's config (or the backend's default config) is compiled
    and cached; a record from a fallback target layer is checked against the default config on
    its first call, never taken blindly. ``kernel.records`` maps ``(bucket, dtype)`` to the record
    serving it; ``kernel.selection`` says in words which backend and configs were chosen, why.
    With ``seq``/``seq_k`` that bucket is selected now: ``kernel.config``, ``source`` and
    ``record`` are its (else the default config's, and ``record`` is None). On a miss there,
    ``tune=True`` tunes it for ``(batch, seq, seq_k, dtype)`` (seq 1024 without ``seq``) and
    stores the winner; ``tune="new-shapes"`` tunes every bucket a call meets without an exact
    record, once per machine (a small budget, at the bucket's upper bound).

    ``backend`` names a registered backend or is ``"auto"``: with ``seq``, when every supported
    backend has a tuning record of that bucket, the one whose record is fastest; else (and
    without ``seq``) the highest ``priority`` for the target.
    Unknown config names, or a config the backend's search space does not accept on this
    target, raise BackendError. ``dtype`` also tells the
    backend which element size a config must fit (``graph.graph["dtype"]``: shared memory and
    registers scale with it); a call in another dtype compiles its own variant.
    """
    from attncc.target import default_target
    from attncc.tuning.dispatch import Dispatch

    if tune not in (False, True, "new-shapes"):
        raise InputError(f"tune: expected False, True or 'new-shapes', got {tune!r}")
    spec = load_spec(spec)
    graph = lower(spec)
    graph.graph["dtype"] = dtype
    target = target or default_target()
    candidates = _supported(backend, graph, target)
    if config:
        chosen, why = _choose(candidates, {}, target)
        kernel = chosen.compile(graph, full_config(chosen, graph, target, config), target)
        kernel.records = {}
        kernel.selection = (f"backend {chosen.name} ({why}); config from the config passed in, "
                            "for every shape")
        return kernel
    store = open_or_warn(db)
    # each backend's record of the seq bucket (any bucket without seq); a read fault only warns
    bucket = "" if seq is None else bucket_of(seq, seq_k or seq)
    records = {b.name: find_or_warn(store, Key.of(spec, bucket, dtype, b, target), target,
                                    any_bucket=seq is None) for b in candidates}
    # times compare only at a known shape: without seq= the backends' newest records may be of
    # other buckets (a decoding step's against a prefill's), so priority chooses
    chosen, why = _choose(candidates, records if seq is not None else {}, target)
    kernel = Dispatch(chosen, spec, target, dtype=dtype, db=store, why=why,
                      tune="new-shapes" if tune == "new-shapes" else False)
    record, tuned = records.get(chosen.name) if seq is not None else None, False
    if tune and record is None and store is not False:
        record, tuned = _tune_here(spec, chosen, batch, seq or 1024, seq_k, dtype, store,
                                   target), True
    if seq is not None or tuned:
        seq_q = seq or 1024
        kernel.prepare(seq_q, seq_k or seq_q, dtype, record, tuned)
    return kernel


def _tune_here(spec, backend, batch, seq, seq_k, dtype, store, target) -> Record:
    """``tune`` for ``compile(tune=True)`` (whose argument hides the function's name there)."""
    return tune(spec, backend, batch=batch, seq=seq, seq_k=seq_k, dtype=dtype, db=store,
                target=target, progress=False)


def attention_map(spec, q, k, v, *, heads=None, rows=None, backend: str = "auto", **inputs):
    """The exact attention weights of ``spec`` (``Kernel.attention_map``), computed by the
    kernel ``compile(spec, backend)`` from its own statistics; shape ``(B, len(heads),
    len(rows), memory_tokens + seq_k)``. ``backend="auto"`` takes the fastest supported backend
    whose library matches the arrays (torch tensors or NumPy arrays)."""
    import array_api_compat

    from attncc.target import default_target

    if backend == "auto":
        library = "torch" if array_api_compat.is_torch_array(q) else "numpy"
        target = default_target()
        found = [b for b in _supported("auto", lower(load_spec(spec)), target)
                 if b.library == library]
        if not found:
            raise BackendError(f"backend: no installed backend takes {library} arrays")
        backend = _choose(found, {}, target)[0].name
    kernel = compile(spec, backend)
    return kernel.attention_map(q, k, v, heads=heads, rows=rows, **inputs)


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


#: ``effort`` presets: configs to measure and the time budget in seconds (None: no limit).
EFFORTS = {"quick": (12, 60.0), "standard": (40, None), "full": (200, None)}


def tune(spec, backend: str | Backend = "numpy", *, batch: int = 1, seq: int = 1024,
         seq_k: int | None = None, dtype: str = "float32", trials: int | None = None,
         budget_s: float | None = None, effort: str = "standard", heads: int | None = None,
         workers: int = 1, db=None, storage: str | None = None, plot_dir=None, target=None,
         seed: int | None = None, progress: bool = True, timer=None, heartbeat: int = 30,
         sampler: str = "tpe", guide: bool = True) -> Record:
    """Tune ``backend``'s tile parameters for ``spec`` at ``(batch, seq, seq_k)`` and ``dtype``.

    The record covers the shape bucket of ``(seq, seq_k)`` and is tuned at the sizes it will
    serve: the bucket's upper bound (``seq=3000`` is timed at 4096), ``batch`` and ``heads``
    (default: the spec's, else 4) as given. Needs the ``tune`` extra (Optuna, SQLAlchemy).
    ``trials`` configs are measured (at most the number of valid ones), stopping early once
    ``budget_s`` seconds have passed; ``effort`` (``quick``, ``standard``, ``full``: ``EFFORTS``)
    gives whichever of the two is not passed. With ``workers > 1`` that many processes share the
    study (``backend`` must then be a registered name). ``db`` is the record database (a path, URL
    or ``Store``; default ``$ATTNCC_DB``, then ``~/.cache/attncc/tuning.db``); ``storage`` the
    Optuna storage URL (default: beside ``db``, ``attncc.db.store.study_storage``); ``plot_dir``
    gets the optimization-history and parameter-importance PNGs. ``target`` is a ``Target``, a
    device name (``"cpu"``, ``"cuda"``) or None for this CPU. ``timer(kernel, (q, k, v, inputs),
    repeat) -> Timing`` replaces the wall-clock measurement; ``heartbeat`` is the seconds between
    trial heartbeats (a trial silent for twice as long is failed); ``sampler`` is ``tpe``, ``gp``
    or ``random``; ``seed`` seeds this process's sampler (worker processes sample unseeded, so
    only a ``workers=1`` tune repeats exactly); ``guide`` lets the plan-based cost model propose
    every other trial. Every
    config is checked against the reference before it is timed (a wrong one scores inf).
    Returns the stored Record, its ``note`` the closing summary (speedup over the default
    config, share of the space measured). Raises InputError for bad arguments, BackendError when
    no config runs, DatabaseError when the database cannot be used.
    """
    from attncc.target import default_target
    from attncc.tuning.tuner import Problem, search

    if effort not in EFFORTS:
        raise InputError(f"tune: expected effort one of {sorted(EFFORTS)}, got {effort!r}")
    trials = EFFORTS[effort][0] if trials is None else trials
    budget_s = EFFORTS[effort][1] if budget_s is None else budget_s
    if trials < 1 or workers < 1 or (budget_s is not None and budget_s <= 0):
        raise InputError(f"tune: expected trials >= 1, workers >= 1 and budget_s > 0, got "
                         f"trials={trials}, workers={workers}, budget_s={budget_s}")
    if workers > 1 and not isinstance(backend, str):
        raise InputError("tune: workers > 1 needs the backend by its registered name")
    spec = load_spec(spec)
    chosen = registry.get(backend) if isinstance(backend, str) else backend
    if target is None or isinstance(target, str):
        target = default_target(target)
    seq_q, seq_k = upper_bound(bucket_of(seq, seq_k or seq))
    problem = Problem(spec, chosen, target, batch, seq_q, seq_k, dtype, timer, heads=heads)
    return search(problem, db, trials=trials, workers=workers, storage=storage, seed=seed,
                  heartbeat=heartbeat, sampler=sampler, guide=guide, progress=progress,
                  plot_dir=plot_dir, budget_s=budget_s)
