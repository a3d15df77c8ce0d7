"""[8] JSONL import/export of tuning records, and the shipped pre-tuned layer.

One record per line, ``Record.dumps()`` (canonical JSON, sorted keys), lines sorted by record id, so
that an export is byte-stable and ``export -> import -> export`` round-trips exactly.

The shipped layer is every ``*.jsonl`` under ``tuning_db/`` (the repository folder beside the
``attncc`` package, or ``$ATTNCC_SHIPPED_DB``): read-only records that a lookup consults after the
user's database. A damaged shipped file is skipped with a warning naming the file and line, so that
a bad download never stops compilation.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from functools import cache
from pathlib import Path

from attncc.db.key import DatabaseError, Record
from attncc.db.store import Store


def dump(records: list[Record], out: io.TextIOBase) -> int:
    """Write ``records`` as JSONL to ``out`` (sorted by id); the number written."""
    for record in sorted(records, key=lambda r: r.id):
        out.write(record.dumps() + "\n")
    return len(records)


def export(store: Store, path: str | os.PathLike, **filters) -> int:
    """Write the store's records matching ``filters`` (see ``Store.records``) to ``path``."""
    records = store.records(**filters)
    try:
        with open(path, "w", encoding="utf-8") as out:
            return dump(records, out)
    except OSError as err:
        raise DatabaseError(f"cannot write {path}: {err.strerror or err}") from None


def parse(text: str, where: str) -> list[Record]:
    """The records of JSONL ``text``; DatabaseError naming ``where`` and the line when malformed.

    Blank lines are skipped; two records with one key is an error (which one would win?).
    """
    records: dict[str, tuple[int, Record]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatabaseError(f"{where}:{number}: expected one JSON object per line, got "
                                f"invalid JSON ({err.msg} at column {err.colno})") from None
        except RecursionError:
            raise DatabaseError(f"{where}:{number}: expected one JSON object per line, got "
                                "JSON nested too deeply") from None
        record = Record.from_json(data, f"{where}:{number}")
        if record.id in records:
            raise DatabaseError(f"{where}:{number}: duplicate record {record.id} (same key as "
                                f"line {records[record.id][0]})")
        records[record.id] = (number, record)
    return [record for _, record in records.values()]


def read(path: str | os.PathLike) -> list[Record]:
    """The records in the JSONL file at ``path``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise DatabaseError(f"cannot read {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise DatabaseError(f"{path}: expected UTF-8 JSONL, got undecodable bytes "
                            f"at offset {err.start}") from None
    return parse(text, str(path))


def import_(store: Store, path: str | os.PathLike, *, replace: bool = True) -> tuple[int, int]:
    """Put every record of ``path`` into ``store``: ``(written, skipped)``.

    The whole file is validated before anything is written. With ``replace=False`` a key that is
    already stored keeps its record (counted as skipped). Records keep their own dates.
    """
    records = read(path)
    written = skipped = 0
    for record in records:
        if not replace and store.get(record.key) is not None:
            skipped += 1
            continue
        store.put(record)
        written += 1
    return written, skipped


def shipped_dir() -> Path:
    """The folder of shipped JSONL files (see the module docstring)."""
    env = os.environ.get("ATTNCC_SHIPPED_DB")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "tuning_db"


def shipped() -> list[tuple[str, Record]]:
    """Every shipped record with the file it came from, files in name order."""
    return list(_shipped(str(shipped_dir())))


@cache
def _shipped(folder: str) -> tuple[tuple[str, Record], ...]:
    found = []
    for path in sorted(Path(folder).glob("*.jsonl")):
        try:
            found.extend((str(path), record) for record in read(path))
        except DatabaseError as err:
            warnings.warn(f"skipping shipped tuning records: {err}", stacklevel=3)
    return tuple(found)
