"""[8] Finding the record for a compile: exact target first, then the nearest layer.

Order: an exact target match in the user's database, then an exact match among the shipped
records; then, layer by layer (same device and architecture with other versions, then same device
model), the user's database before the shipped records. The record that is returned says how it
matched in ``note`` and where it came from in ``origin``. Records from other devices never match.
"""

from __future__ import annotations

from attncc.db.exchange import shipped
from attncc.db.key import Key, Record
from attncc.db.store import Store
from attncc.errors import AttnccError


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
            return best.with_(note=message, origin=origin)
    return None
