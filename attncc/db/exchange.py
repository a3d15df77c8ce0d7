"""[8] JSONL import/export of tuning records, and the shipped pre-tuned layer.

One record per line, ``Record.dumps()`` (canonical JSON, sorted keys), lines sorted by record id, so
that an export is byte-stable and ``export -> import -> export`` round-trips exactly.

The shipped layer is every ``*.jsonl`` in one folder of read-only records that a lookup consults
after the user's database: ``$ATTNCC_SHIPPED_DB`` when set, else ``tuning_db/`` at the root of a
source checkout (beside ``attncc/`` and ``pyproject.toml``), else the copy an installed wheel
carries as package data (``attncc/tuning_db``, put there by the build step in ``setup.py``). A
damaged shipped file is skipped with a warning naming the file and line, so that a bad download
never stops compilation.
"""

from __future__ import annotations

import importlib.resources
import json
import os
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from attncc.db.key import DatabaseError, Record
from attncc.errors import warn

if TYPE_CHECKING:
    from attncc.db.store import Store


def export(store: Store, path: str | os.PathLike, **filters) -> int:
    """Write the store's records matching ``filters`` (see ``Store.records``) to ``path`` as
    JSONL, sorted by id; the number written."""
    records = sorted(store.records(**filters), key=lambda r: r.id)
    try:
        with open(path, "w", encoding="utf-8") as out:
            out.writelines(record.dumps() + "\n" for record in records)
            return len(records)
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
        except (json.JSONDecodeError, RecursionError) as err:
            got = (f"invalid JSON ({err.msg} at column {err.colno})"
                   if isinstance(err, json.JSONDecodeError) else "JSON nested too deeply")
            raise DatabaseError(f"{where}:{number}: expected one JSON object per line, got "
                                f"{got}") from None
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


SHIPPED_ENV = "ATTNCC_SHIPPED_DB"
#: The shipped folder's name, at the repository root and inside the installed package alike.
SHIPPED_NAME = "tuning_db"


def shipped_dir() -> Path:
    """The folder of shipped JSONL files (see the module docstring for the order).

    Where no candidate exists the repository path is returned; it holds no files, so nothing is
    shipped.
    """
    env = os.environ.get(SHIPPED_ENV)
    if env:
        return Path(env)
    return first_shipped_dir(Path(__file__).resolve().parents[2], _package_root())


def first_shipped_dir(repo_root: Path, package_root: Path | None) -> Path:
    """``repo_root/tuning_db`` when ``repo_root`` is a source checkout (it has ``pyproject.toml``
    and the folder), else ``package_root/tuning_db`` when that folder exists, else the first."""
    repo = repo_root / SHIPPED_NAME
    if (repo_root / "pyproject.toml").is_file() and repo.is_dir():
        return repo
    if package_root is not None and (package_root / SHIPPED_NAME).is_dir():
        return package_root / SHIPPED_NAME
    return repo


def _package_root() -> Path | None:
    """The installed ``attncc`` package folder; None where it is not on a file system (a zip)."""
    root = importlib.resources.files("attncc")
    return root if isinstance(root, Path) else None


def shipped() -> list[tuple[str, Record]]:
    """Every shipped record with the file it came from, files in name order; read once per
    folder and process (``reread_shipped`` forgets what was read)."""
    return list(_shipped(str(shipped_dir())))


def reread_shipped() -> None:
    """Forget the shipped records read so far: the next ``shipped()`` reads the files again."""
    _shipped.cache_clear()


@cache
def _shipped(folder: str) -> tuple[tuple[str, Record], ...]:
    found = []
    for path in sorted(Path(folder).glob("*.jsonl")):
        try:
            found.extend((str(path), record) for record in read(path))
        except DatabaseError as err:
            warn(f"skipping shipped tuning records: {err}")
    return tuple(found)
