"""[8] Finding the record for a compile: exact target first, then the nearest layer.

``lookup`` finds the record a compile would use (no benchmarking, no Optuna); ``find`` does the
matching (``attncc.compile`` calls it through ``find_or_warn``). Reading the shipped
``tuning_db/`` records needs nothing beyond attncc itself; the user's database needs SQLAlchemy
(the ``tune`` extra): without it only the shipped records are read, with a warning when a
database was named (``db`` or ``$ATTNCC_DB``).

Order: an exact target match in the user's database, then an exact match among the shipped
records; then, layer by layer (same device and architecture with other versions, then same device
model), the user's database before the shipped records. The record that is returned says how it
matched in ``note``, where it came from in ``origin`` and the layer it shares in ``layer`` (below 3:
a fallback, a hint that ``attncc.tuning.dispatch`` checks before use). Records from other devices
never match.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from attncc.backends import registry
from attncc.db.exchange import shipped
from attncc.db.key import Key, Record, bucket_of, upper_bound
from attncc.errors import AttnccError, warn
from attncc.spec.load import load_spec

if TYPE_CHECKING:
    from attncc.backends.base import Backend
    from attncc.db.store import Store


def lookup(spec, backend: str | Backend, sizes=None, dtype: str = "float32", target=None,
           db=None) -> Record | None:
    """The tuned record a compile should use, or None (no benchmarking happens here).

    ``spec``: anything ``load_spec`` takes; ``backend``: a registered name or a Backend.
    ``sizes``: an int (seq), ``(seq_q, seq_k)``, a dict with ``seq_q``/``seq_k``, a bucket string
    ``q<Q>-k<K>``, or None for any bucket (the most recently updated at the best target match).
    ``target``: a ``Target``, a device name (``"cpu"``, ``"cuda"``) or None for this CPU. ``db``:
    the user's database (a path, URL or ``Store``; default ``$ATTNCC_DB``, then
    ``~/.cache/attncc/tuning.db``); one that cannot be read raises DatabaseError.
    """
    from attncc.target import default_target

    spec = load_spec(spec)
    chosen = registry.get(backend) if isinstance(backend, str) else backend
    if target is None or isinstance(target, str):
        target = default_target(target)
    bucket = _bucket(sizes)
    key = Key.of(spec, bucket or "", dtype, chosen, target)
    return find(open_store(db), key, target, any_bucket=bucket is None)


def open_store(db) -> Store | None:
    """The user's database ``db`` (a path, URL, ``Store`` or None: ``$ATTNCC_DB``, then the
    default file) as a Store; None without SQLAlchemy (a warning when a database was named)."""
    try:
        from attncc.db.store import Store
    except ImportError:  # SQLAlchemy missing: shipped records only
        if db is not None or os.environ.get("ATTNCC_DB"):
            warn("attncc: the tuning database is not read without SQLAlchemy "
                 "(pip install 'attncc[tune]'); using the shipped records only")
        return None
    return db if isinstance(db, Store) else Store(db)


def open_or_warn(db):
    """``open_store(db)``, or False (a warning) where the database cannot be opened."""
    try:
        return open_store(db)
    except AttnccError as err:
        warn(f"attncc: tuning database not used: {err}")
        return False


def find_or_warn(store, key: Key, target, *, any_bucket: bool = False):
    """``find`` in ``store`` (False: none, from ``open_or_warn``), or None (a warning) where the
    records cannot be read."""
    if store is False:
        return None
    try:
        return find(store, key, target, any_bucket=any_bucket)
    except AttnccError as err:
        warn(f"attncc: tuning database not used: {err}")
        return None


def _bucket(sizes) -> str | None:
    if sizes is None:
        return None
    if isinstance(sizes, str):
        upper_bound(sizes)  # a clear error for a malformed bucket
        return sizes
    if isinstance(sizes, int):
        return bucket_of(sizes)
    if isinstance(sizes, dict):
        return bucket_of(int(sizes["seq_q"]), int(sizes.get("seq_k", sizes["seq_q"])))
    seq_q, seq_k = sizes
    return bucket_of(int(seq_q), int(seq_k))


def find(store: Store | None, key: Key, target, *, any_bucket: bool = False) -> Record | None:
    """The best record for ``key`` on ``target`` (a ``Target``), or None.

    ``key.target`` is ignored in favour of ``target``'s layers, which are compared with the layers
    of each record's key (``Target.key(3)`` joins them with ``/``). With ``any_bucket`` the bucket
    is not matched and, among equally good matches, the most recently updated record wins.
    """
    from attncc.target import Target

    def candidates(records: list[tuple[str, Record]]) -> list[tuple[str, Record]]:
        return [(origin, r) for origin, r in records
                if r.key.spec_hash == key.spec_hash and r.key.dtype == key.dtype
                and r.key.backend == key.backend and (any_bucket or r.key.bucket == key.bucket)]

    layers: list[list[tuple[str, Record]]] = []
    if store is not None:
        mine = store.records(spec_hash=key.spec_hash, dtype=key.dtype, backend=key.backend,
                             bucket=None if any_bucket else key.bucket)
        layers.append(candidates([(f"database {store.display}", r) for r in mine]))
    layers.append(candidates([(f"shipped {path}", r) for path, r in shipped()]))
    for depth in (3, 2, 1):
        mine = target.key(depth)
        for layer in layers:
            hits = [(origin, r) for origin, r in layer
                    if "/".join(r.key.target.split("/")[:depth]) == mine]
            if not hits:
                continue
            origin, best = max(hits, key=lambda hit: hit[1].updated)
            try:
                _, _, message = target.nearest([Target.from_dict(best.fingerprint)])
            except AttnccError:  # a fingerprint from another attncc version: the key still holds
                message = ("exact match" if depth == 3 else
                           f"no exact match; using a record that shares the first {depth} "
                           f"target layer(s): {best.key.target}")
            return best.with_(note=message, origin=origin, layer=depth)
    return None
