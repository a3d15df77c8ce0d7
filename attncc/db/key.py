"""[8] What a tuning record is keyed by, and the record itself.

A record is keyed by ``(spec hash, shape bucket, dtype, backend@version, target key)``:

- **spec hash**: ``Spec.hash``, equal for specs that mean the same (name and doc do not count).
- **shape bucket**: ``q<Q>-k<K>`` where ``Q`` and ``K`` are ``seq_q`` and ``seq_k`` rounded *up* to
  the next power of two (``seq=3000`` -> ``q4096-k4096``; decoding ``seq_q=1, seq_k=4096`` ->
  ``q1-k4096``). Tile choices change with the sequence length, rarely with the batch, so the batch
  is not part of the key; one record serves every length in ``(Q/2, Q]``.
- **dtype**: the element type of q, k, v (``float32``, ``bfloat16``...).
- **backend@version**: ``Backend.name`` and ``Backend.version``; a new backend version starts
  afresh.
- **target**: ``Target.key(3)`` (device / architecture / versions). The whole Target is stored in
  the record (``fingerprint``), so that a lookup elsewhere can fall back to the nearest layer.

``SCHEMA_VERSION`` is the record format this attncc writes and reads; a newer one is refused with
a message, never silently dropped or overwritten.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime

from attncc.errors import AttnccError, InputError

SCHEMA_VERSION = 1


class DatabaseError(AttnccError, RuntimeError):
    """The tuning database cannot be opened, read or written; the message says why and what to do.

    No record that was readable before is ever dropped when this is raised.
    """


def bucket_of(seq_q: int, seq_k: int | None = None) -> str:
    """The shape bucket ``q<Q>-k<K>`` of a call (see the module docstring)."""
    seq_k = seq_q if seq_k is None else seq_k
    for name, value in (("seq_q", seq_q), ("seq_k", seq_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"shape bucket: expected {name} a positive int, got {value!r}")
    return bucket_unchecked(seq_q, seq_k)


def bucket_unchecked(seq_q, seq_k) -> str:
    """``bucket_of`` for sizes known to be positive, also torch's symbolic ones: the powers of
    two are found by doubling, so under ``torch.compile`` dynamo guards each comparison where
    ``int.bit_length`` would specialise every length."""
    return f"q{_pow2(seq_q)}-k{_pow2(seq_k)}"


def upper_bound(bucket: str) -> tuple[int, int]:
    """``(Q, K)`` of bucket ``q<Q>-k<K>``: the longest call it serves, at which it is tuned.
    InputError for anything that is not such a bucket."""
    found = re.fullmatch(r"q([1-9][0-9]*)-k([1-9][0-9]*)", str(bucket))
    if found is None or bucket != bucket_of(int(found[1]), int(found[2])):
        raise InputError(f"shape bucket: expected 'q<Q>-k<K>' with Q and K powers of two "
                         f"(e.g. 'q1024-k1024'), got {bucket!r}")
    return int(found[1]), int(found[2])


def _pow2(n) -> int:
    edge = 1
    while edge < n:
        edge *= 2
    return edge


def now() -> str:
    """The current UTC time as ISO-8601 text, second precision (what records store)."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


@dataclass(frozen=True)
class Key:
    """The identity of a tuning record; ``backend`` is ``name@version``, ``target`` a key(3)."""

    spec_hash: str
    bucket: str
    dtype: str
    backend: str
    target: str

    @classmethod
    def of(cls, spec, bucket: str, dtype: str, backend, target) -> Key:
        """The key of ``spec`` (a Spec) on ``backend`` (a Backend) and ``target`` (a Target) for
        ``bucket`` (``""`` where any bucket will do) and ``dtype``: the one recipe that every
        lookup, tuner and dispatcher uses."""
        return cls(spec.hash, bucket, dtype, f"{backend.name}@{backend.version}", target.key(3))

    @property
    def id(self) -> str:
        """A short stable id (12 hex) for ``attncc db show``."""
        text = "|".join((self.spec_hash, self.bucket, self.dtype, self.backend, self.target))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def backend_name(self) -> str:
        return self.backend.rsplit("@", 1)[0]


@dataclass(frozen=True)
class Record:
    """A tuned config and how it was measured.

    ``median_s`` is the median wall time of one call in seconds, ``spread_s`` the interquartile
    range of the samples it came from; ``trials`` how many configs the study measured;
    ``fingerprint`` the full ``Target.to_dict()`` it was tuned on; ``versions`` the package versions
    at tuning time; ``study`` the Optuna study it came from. ``verified``, when set, says that the
    record is the verdict of a check on this target (a record from another target's layer timed
    against the backend's default config, ``attncc.tuning.dispatch``); it is written only when set.
    ``note``, ``origin`` and ``layer`` are filled by a lookup (how the record matched, where it
    came from, and the deepest target layer it shares: 3 exact, 2 other versions, 1 other
    architecture) and are not stored; a fresh tune puts its summary in ``note``.
    """

    key: Key
    spec_name: str
    config: dict
    median_s: float
    spread_s: float
    trials: int
    fingerprint: dict
    versions: dict
    created: str = field(default_factory=now)
    updated: str = field(default_factory=now)
    study: str | None = None
    schema: int = SCHEMA_VERSION
    verified: str | None = None
    note: str = field(default="", compare=False)
    origin: str = field(default="", compare=False)
    layer: int = field(default=3, compare=False)

    @property
    def id(self) -> str:
        return self.key.id

    def with_(self, **changes) -> Record:
        """A copy with ``changes`` applied."""
        return replace(self, **changes)

    def to_json(self) -> dict:
        """A flat JSON-able dict (one JSONL line); ``Record.from_json`` inverts it exactly."""
        data = asdict(self)
        for name in ("note", "origin", "layer"):
            del data[name]
        if data["verified"] is None:
            del data["verified"]
        return {**data.pop("key"), **data}

    @staticmethod
    def from_json(data: dict, where: str = "record") -> Record:
        """The Record of a dict written by ``to_json``; DatabaseError naming ``where`` if bad.

        A record whose ``schema`` is newer than ``SCHEMA_VERSION`` is refused (upgrade attncc).
        """
        if not isinstance(data, dict):
            raise DatabaseError(f"{where}: expected a JSON object, got {type(data).__name__}")
        schema = data.get("schema")
        if not isinstance(schema, int) or schema < 1:
            raise DatabaseError(f"{where}: expected 'schema' a positive int, got {schema!r}")
        if schema > SCHEMA_VERSION:
            raise DatabaseError(f"{where}: written by record schema {schema}, this attncc reads "
                                f"up to schema {SCHEMA_VERSION}; upgrade attncc to read it "
                                "(the record was left as it is)")
        key_names = [f.name for f in fields(Key)]
        known = {*key_names, *(f.name for f in fields(Record))} - {"key", "note", "origin", "layer"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DatabaseError(f"{where}: unknown field '{unknown[0]}'; expected {sorted(known)}")
        types = {"spec_name": (str,), "config": (dict,), "median_s": (int, float),
                 "spread_s": (int, float), "trials": (int,), "fingerprint": (dict,),
                 "versions": (dict,), "created": (str,), "updated": (str,),
                 **dict.fromkeys(key_names, (str,))}
        if "verified" in data:
            types["verified"] = (str,)
        for name, kinds in types.items():
            if not isinstance(data.get(name), kinds) or isinstance(data.get(name), bool):
                raise DatabaseError(f"{where}: expected '{name}' of type "
                                    f"{' or '.join(k.__name__ for k in kinds)}, got "
                                    f"{data.get(name)!r}")
        rest = {k: v for k, v in data.items() if k not in key_names}
        rest["median_s"] = float(rest["median_s"])
        rest["spread_s"] = float(rest["spread_s"])
        for name in ("median_s", "spread_s", "trials"):
            if not math.isfinite(rest[name]) or rest[name] < 0:
                raise DatabaseError(f"{where}: expected '{name}' a finite number >= 0, got "
                                    f"{rest[name]!r}")
        return Record(key=Key(**{k: data[k] for k in key_names}), **rest)

    def dumps(self) -> str:
        """One canonical JSON line (sorted keys, no trailing newline)."""
        return json.dumps(self.to_json(), sort_keys=True)


def tuned_versions(target, backend) -> dict:
    """The ``versions`` a record measured now stores: the target's package versions and the
    backend's (``backend:<name>``)."""
    return {**dict(target.versions), f"backend:{backend.name}": backend.version}
