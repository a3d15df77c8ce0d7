"""[7] Per-shape dispatch: the Kernel ``attncc.compile`` returns unless a config is pinned.

A call's shape bucket (``attncc.db.key.bucket_of(seq_q, seq_k)``) and dtype pick a *variant*:
the backend's kernel compiled with the config of that bucket's record. The first call of a bucket
looks its record up (``attncc.db.lookup.find``: the user's database, then the shipped records),
compiles the variant and caches it; every later call with the same ``(seq_q, seq_k, dtype)``
costs one dict lookup. ``records`` maps ``(bucket, dtype)`` to the record that serves it (None:
the default config); ``selection`` says the same in words. Variants with equal configs are one
compiled kernel.

A record that matches only through a fallback layer (``Record.layer`` < 3: other versions or
another ISA) is a hint, never taken blindly: the first call of its bucket times it against the
default config on that call (``verify.against_default``) and the faster one serves the bucket; the
verdict is stored as a record for this exact target (``verified`` set), so the check runs once per
machine. With ``tune="new-shapes"`` a bucket without an exact record is tuned on first sight
instead (``NEW_SHAPE_TRIALS`` configs at the bucket's upper bound and the call's batch and heads,
the hint enqueued first) and stored.

Where the record's bucket is known before any call (``attncc.compile(seq=...)``), ``prepare``
selects it without timing; a hint then serves nothing until its check on the first call. Other
attributes (``last_stats``, ``tables``...) are read from the variant that ran last.
"""

from __future__ import annotations

import json

from attncc.backends.base import Backend, Kernel
from attncc.backends.config import full_config
from attncc.db.key import Key, Record, bucket_of, bucket_unchecked
from attncc.errors import AttnccError, BackendError, warn

#: Configs a ``tune="new-shapes"`` tune measures for a new bucket.
NEW_SHAPE_TRIALS = 8
#: Distinct (seq_q, seq_k, dtype) remembered before the shape cache starts afresh.
SHAPES_CAP = 4096
DEFAULT = "the backend's default config"


class Dispatch(Kernel):
    """See the module docstring. ``db`` is what ``attncc.db.lookup.open_store`` takes (opened on
    the first lookup); ``tune`` is False or ``"new-shapes"``; ``why`` says why ``backend`` was
    chosen."""

    def __init__(self, backend: Backend, spec, target, *, dtype: str, db=None, tune=False,
                 why: str = ""):
        from attncc.passes.pipeline import lower

        self.backend, self.spec, self._backend, self._target = backend.name, spec, backend, target
        self._db, self._store, self._tune, self._why = db, None, tune, why
        self._unfit: Exception | None = None
        self._lower, self._graphs = lower, {}
        self._variants: dict[tuple, Kernel] = {}  # (bucket, dtype) -> variant
        self._kernels: dict[tuple, Kernel] = {}  # (dtype, config text) -> compiled kernel
        self._shapes: dict[tuple, Kernel] = {}  # (seq_q, seq_k, dtype object) -> variant
        self._pending: dict[tuple, Record] = {}  # hints waiting for their check
        self._ops: dict[int, object] = {}
        self.records: dict[tuple, Record | None] = {}
        self.sources: dict[tuple, str] = {}
        self._primary = self._last = self._compiled(dtype, None)
        self._primary_slot = None
        self.backward = None if self._primary.backward is None else self._backward

    # --- what base.Kernel declares ---------------------------------------------------------------

    @property
    def config(self) -> dict:
        return self._primary.config

    @property
    def source(self) -> str:
        return self._primary.source

    @property
    def record(self) -> Record | None:
        return self.records.get(self._primary_slot)

    @property
    def selection(self) -> str:
        buckets = "; ".join(f"{b} {d}: config from {self.sources[b, d]}" for b, d in self.sources)
        return (f"backend {self.backend} ({self._why}); "
                + (buckets or f"config from {DEFAULT} until a call's shape bucket finds a record"
                   " (each bucket is looked up on first sight)"))

    def __call__(self, q, k, v, *, return_lse: bool = False, **inputs):
        self._last = kernel = self._variant(q, k, v, inputs)
        return kernel(q, k, v, return_lse=return_lse, **inputs)

    def _backward(self, q, k, v, grad_out, **inputs):
        return self._variant(q, k, v, inputs).backward(q, k, v, grad_out, **inputs)

    def _variant(self, q, k, v, inputs: dict) -> Kernel:
        """The variant of this call's shape: one dict lookup once the shape has been seen."""
        try:
            return self._shapes[q.shape[-2], k.shape[-2], q.dtype]
        except (KeyError, AttributeError, IndexError, TypeError):
            return self._resolve(q, k, v, inputs)

    def companions(self) -> dict[str, str]:
        return self._primary.companions()

    def torch_op(self):
        """The variants' own operators, the variant chosen per call from the traced shapes
        (``fn.op``/``fn.args``/``fn.ops`` are the primary variant's); None where the backend
        has none. A hint met while tracing is not timed: the default config serves it. Under
        ``torch.compile`` the variant comes from the shapes already called eagerly (else the
        primary one), so dynamo traces only a dict lookup and the operator."""
        own = self._primary.torch_op()
        if own is None:
            return None

        from torch.compiler import is_compiling

        by_shape: dict = {}  # (seq_q, seq_k, dtype) -> operators, filled by eager calls

        def fn(q, k, v, **inputs):
            if is_compiling():  # no lookup or op registration inside a trace
                return by_shape.get((q.shape[-2], k.shape[-2], q.dtype), own)(q, k, v, **inputs)
            ops = by_shape.get((q.shape[-2], k.shape[-2], q.dtype))
            if ops is not None:
                return ops(q, k, v, **inputs)
            kernel = self._resolve(q, k, v, inputs, timed=False)
            ops = self._ops.get(id(kernel))
            if ops is None:
                ops = self._ops[id(kernel)] = kernel.torch_op()
            if len(by_shape) >= SHAPES_CAP:
                by_shape.clear()
            by_shape[q.shape[-2], k.shape[-2], q.dtype] = ops
            return ops(q, k, v, **inputs)

        fn.op, fn.args, fn.ops = own.op, own.args, getattr(own, "ops", None)
        return fn

    def traceable(self):
        """The traceable function (``Kernel.traceable``) of the variant that serves the traced
        call's shape bucket and dtype, so a record with a config the sdpa path does not take
        (``use_sdpa=False``) keeps its variant on the library op. The variant is resolved
        eagerly, at trace time, by an ``assume_constant_result`` function of the bucket (as
        ``torch_op`` resolves one: untimed, so a hint met while tracing leaves the default config
        serving); dynamo traces only the bucket arithmetic and the variant's function."""
        import torch

        from attncc.lowering.prologue import dtype_name

        table = _Traced()

        @torch.compiler.assume_constant_result
        def variant(bucket: str, dtype) -> str:
            kernel = self._slot((bucket, dtype_name(dtype)), None)
            name = f"k{id(kernel)}"
            if not hasattr(table, name):
                setattr(table, name, kernel.traceable())
            return name

        def fn(q, k, v, **inputs):
            if not all(isinstance(x, torch.Tensor) and x.dim() == 4 for x in (q, k)):
                return None  # the variant's prologue says why
            own = getattr(table, variant(bucket_unchecked(q.shape[2], k.shape[2]), q.dtype))
            return None if own is None else own(q, k, v, **inputs)

        return fn

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._last, name)

    # --- choosing a variant ----------------------------------------------------------------------

    def prepare(self, seq_q: int, seq_k: int, dtype: str, record: Record | None = None,
                tuned: bool = False) -> None:
        """Select the bucket of ``(seq_q, seq_k)`` now (no timing) and make it the primary one:
        ``config``, ``source`` and ``record`` are its. ``record`` is that bucket's lookup when the
        caller has it (``tuned``: it was just tuned)."""
        slot = (bucket_of(seq_q, seq_k), dtype)
        found = record if record is not None else self._lookup(*slot)
        self._primary = self._last = self._select(slot, found, None, tuned)
        self._primary_slot = slot

    def _resolve(self, q, k, v, inputs: dict, timed: bool = True) -> Kernel:
        from attncc.lowering.prologue import dtype_name

        try:
            shape = (int(q.shape[-2]), int(k.shape[-2]), q.dtype)
            slot = (bucket_of(shape[0], shape[1]), dtype_name(q.dtype))
        except (AttributeError, IndexError, TypeError, AttnccError):
            return self._primary  # not an array of attention shape: its prologue says so
        kernel = self._slot(slot, (q, k, v, inputs) if timed else None)
        if slot not in self._pending:
            if len(self._shapes) >= SHAPES_CAP:
                self._shapes.clear()
            self._shapes[shape] = kernel
        return kernel

    def _slot(self, slot: tuple, call) -> Kernel:
        """The variant of ``slot`` (bucket, dtype name), selected on its first sight; ``call``
        (q, k, v, inputs) allows tuning and a hint's check (see ``_select``)."""
        from attncc.lowering.prologue import COMPUTE

        if slot[1] not in COMPUTE:
            return self._primary
        if slot not in self._variants:
            self._variants[slot] = self._select(slot, self._lookup(*slot), call)
        elif slot in self._pending and call is not None:
            self._variants[slot] = self._select(slot, self._pending[slot], call)
        return self._variants[slot]

    def _select(self, slot: tuple, record: Record | None, call, tuned: bool = False) -> Kernel:
        """The variant of ``slot`` for ``record`` (a lookup's result), recorded in ``records``
        and ``sources``; ``call`` (q, k, v, inputs) allows tuning and a hint's check."""
        self._pending.pop(slot, None)
        hint = record if record is not None and record.layer < 3 else None
        if (record is None or hint is not None) and call is not None and self._tune:
            record, tuned = self._tune_now(slot, call, hint), True
        elif hint is not None and call is not None:
            record = self._verify(slot, hint, call)
        elif hint is not None:
            self._pending[slot] = hint
            self.records[slot] = None
            self.sources[slot] = (f"{DEFAULT} until the first call of this bucket checks record "
                                  f"{hint.id} ({hint.note}) against it")
            return self._compiled(slot[1], None)
        if record is None:
            source = f"{DEFAULT} (no tuning record for this spec, backend, bucket and target)"
        elif tuned:
            source = f"freshly tuned record {record.id} ({record.note})"
        elif record.verified:
            source = f"tuning record {record.id} (verified here: {record.verified})"
        else:
            source = f"tuning record {record.id} ({record.note}; {record.origin})"
        kernel = self._compiled(slot[1], record.config if record else None)
        if record is not None and kernel is None:
            warn(f"attncc: tuning record {record.id} not used: {self._unfit}")
            record, kernel = None, self._compiled(slot[1], None)
            source = f"{DEFAULT} (the tuning record's config does not fit)"
        self.records[slot], self.sources[slot] = record, source
        return kernel

    def _compiled(self, dtype: str, config: dict | None) -> Kernel | None:
        """The kernel for ``config`` (None: the default) at ``dtype``, compiled once; None when a
        record's config does not fit, or is one the tuner would not time now (``keep``), as a
        record tuned before a faster path existed (the reason in ``_unfit``)."""
        text = None if config is None else json.dumps(config, sort_keys=True, default=repr)
        if (dtype, text) not in self._kernels:
            graph = self._graphs.get(dtype)
            if graph is None:
                graph = self._graphs[dtype] = self._lower(self.spec)
                graph.graph["dtype"] = dtype
            try:
                full = full_config(self._backend, graph, self._target, config)
                space = self._backend.search_space(graph, self._target)
                if config is not None and not space.keep(full):
                    raise BackendError(f"config {config} is one the search space no longer "
                                       "times here (its keep() rejects it: a faster path "
                                       "serves this spec)")
            except BackendError as err:
                if config is None:
                    raise
                self._unfit = err
                return None
            self._kernels[dtype, text] = self._backend.compile(graph, full, self._target)
        return self._kernels[dtype, text]

    # --- the database ----------------------------------------------------------------------------

    def _key(self, bucket: str, dtype: str) -> Key:
        return Key.of(self.spec, bucket, dtype, self._backend, self._target)

    def _open(self):
        if self._store is None:
            from attncc.db.lookup import open_or_warn

            self._store = (open_or_warn(self._db),)
        return self._store[0]

    def _lookup(self, bucket: str, dtype: str) -> Record | None:
        from attncc.db.lookup import find_or_warn

        return find_or_warn(self._open(), self._key(bucket, dtype), self._target)

    def _verify(self, slot: tuple, hint: Record, call) -> Record:
        from attncc.tuning.verify import against_default

        hint_kernel = self._compiled(slot[1], hint.config)
        default = self._compiled(slot[1], None)
        if hint_kernel is None:  # does not fit here: _select warns and uses the default
            return hint
        verdict = against_default(hint, hint_kernel, default, call, self._key(*slot),
                                  spec=self.spec, backend=self._backend, target=self._target)
        store = self._open()
        if store:
            try:
                store.put(verdict)
            except AttnccError as err:
                warn(f"attncc: verdict on record not stored: {err}")
        return verdict

    def _tune_now(self, slot: tuple, call, hint: Record | None) -> Record | None:
        """Tune ``slot`` at its bucket's upper bound; None (a warning) when tuning cannot run."""
        from attncc.db.key import upper_bound

        q, store = call[0], self._open()
        try:
            if not store:
                raise AttnccError("no tuning database to store the result in")
            from attncc.tuning.tuner import Problem, search

            seq_q, seq_k = upper_bound(slot[0])
            problem = Problem(self.spec, self._backend, self._target, int(q.shape[0]), seq_q,
                              seq_k, slot[1], heads=int(q.shape[1]),
                              hints=[hint.config] if hint else [])
            return search(problem, store, trials=NEW_SHAPE_TRIALS, workers=1,
                          storage=None, seed=None, heartbeat=30, sampler="tpe", guide=True,
                          progress=False, plot_dir=None)
        except (ImportError, AttnccError) as err:
            warn(f"attncc: bucket {slot[0]} {slot[1]} not tuned: {err}")
            return None if hint is None else self._verify(slot, hint, call)


class _Traced:
    """``Dispatch.traceable``'s variant functions as attributes (as ``ops.OpTable``: dynamo
    reads an attribute afresh at each access, where a dict is snapshotted per trace)."""
