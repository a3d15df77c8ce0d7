"""[8] The tuning database: one SQLAlchemy code path for a SQLite file and for PostgreSQL.

Where it lives (``resolve``): the ``db`` argument / ``--db`` option, else ``$ATTNCC_DB``, else
``~/.cache/attncc/tuning.db``. A value with ``://`` is a SQLAlchemy URL (``postgresql://user@host/db``
uses the psycopg 3 driver), anything else a SQLite file path.

Tables: ``attncc_records`` (one row per Key, the primary key is ``Key.id``) and ``attncc_meta``
(the schema version). Optuna's study tables live next to them: in the same PostgreSQL database,
or in ``<name>.optuna.db`` beside a SQLite file (``study_storage``), so that trial writes of many
workers do not hold the record file's lock.

Many processes on one SQLite file: the file is in WAL mode, every connection waits up to
``timeout`` for a lock (busy_timeout) and a refused lock is retried until then; schema creation
tolerates another process creating the tables at the same moment.

Faults become one ``DatabaseError`` line each: a file that is not a SQLite database, or is
truncated, is never rewritten: it is left in place, a backup copy is saved beside it, and the
message says both paths; a locked database says it waited and for how long; an unreachable server
names the URL (password hidden). A row written by a newer schema is refused, never overwritten.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import NullPool

from attncc.db.key import SCHEMA_VERSION, DatabaseError, Key, Record, now
from attncc.errors import warn

__all__ = ["DEFAULT_PATH", "DatabaseError", "Store", "resolve", "study_storage"]

DEFAULT_PATH = Path("~/.cache/attncc/tuning.db")
SQLITE_MAGIC = b"SQLite format 3\x00"

_meta = sa.MetaData()
RECORDS = sa.Table(
    "attncc_records", _meta,
    sa.Column("id", sa.String(12), primary_key=True),
    sa.Column("spec_hash", sa.String(64), nullable=False, index=True),
    sa.Column("bucket", sa.String(64), nullable=False),
    sa.Column("dtype", sa.String(32), nullable=False),
    sa.Column("backend", sa.String(128), nullable=False),
    sa.Column("target", sa.Text, nullable=False),
    sa.Column("schema", sa.Integer, nullable=False),
    sa.Column("body", sa.Text, nullable=False),  # the full Record.to_json(), canonical JSON
    sa.Column("updated", sa.String(32), nullable=False),
)
META = sa.Table("attncc_meta", _meta,
                sa.Column("name", sa.String(64), primary_key=True),
                sa.Column("value", sa.Text, nullable=False))


def resolve(db: str | os.PathLike | None = None) -> str:
    """The SQLAlchemy URL of the tuning database (see the module docstring for the order)."""
    value = str(db) if db is not None else os.environ.get("ATTNCC_DB") or str(DEFAULT_PATH)
    if "://" in value:
        if value.startswith(("postgresql://", "postgres://")):
            value = "postgresql+psycopg://" + value.split("://", 1)[1]
        return value
    return f"sqlite:///{Path(value).expanduser().resolve()}"


def study_storage(url: str) -> str:
    """Where Optuna keeps the studies of the database at ``url`` (see the module docstring)."""
    path = _sqlite_path(url)
    if path is None:
        return url
    return f"sqlite:///{path.with_name(path.stem + '.optuna.db')}"


def masked(url: str) -> str:
    """``url`` with any password replaced by ``***``, for messages."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa_exc.ArgumentError:
        return url


class Store:
    """The records at one URL. Every method raises DatabaseError (one clear line) on a fault.

    ``timeout`` is how long a SQLite writer waits for another process's lock (seconds).
    """

    def __init__(self, db: str | os.PathLike | None = None, *, timeout: float | None = None):
        self.url = resolve(db)
        self.timeout = float(os.environ.get("ATTNCC_DB_TIMEOUT", 30) if timeout is None
                             else timeout)
        self.path = _sqlite_path(self.url)
        self.display = str(self.path) if self.path else masked(self.url)
        if self.path is not None:
            self._check_sqlite_file()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.engine = sa.create_engine(self.url, poolclass=NullPool,
                                           connect_args={"timeout": self.timeout})
            sa.event.listen(self.engine, "connect", self._sqlite_pragmas)
        else:
            try:
                self.engine = sa.create_engine(self.url, pool_pre_ping=True,
                                               connect_args=connect_args(self.url))
            except (sa_exc.ArgumentError, sa_exc.NoSuchModuleError, ImportError) as err:
                raise DatabaseError(_driver_message(self.url, err)) from None
        schema = self._run("open", self._create)
        if schema > SCHEMA_VERSION:
            raise DatabaseError(f"tuning database {self.display} has schema {schema}; this attncc "
                                f"reads up to schema {SCHEMA_VERSION}: upgrade attncc, or use "
                                "another --db")

    def _sqlite_pragmas(self, dbapi_connection, _record) -> None:
        """Every SQLite connection waits ``timeout`` for a lock (busy_timeout) and the file is in
        WAL mode (readers never block the one writer; the mode persists in the file)."""
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.close()

    def _create(self) -> int:
        """Create the tables unless they exist and record the schema; the stored schema.

        Processes opening a new file at once race here: a CREATE TABLE that finds the table made
        by another process means the other won, and the tables are looked at again; the schema
        row is inserted only if absent (``_insert_new``), then read, whoever wrote it."""
        for attempt in range(3):
            try:
                _meta.create_all(self.engine, checkfirst=True)
                with self.engine.begin() as conn:
                    conn.execute(_insert_new(self.engine.dialect.name, name="schema",
                                             value=str(SCHEMA_VERSION)))
                    row = conn.execute(sa.select(META.c.value)
                                       .where(META.c.name == "schema")).first()
                    return int(row[0])
            except (sa_exc.IntegrityError, sa_exc.OperationalError, sa_exc.ProgrammingError) as err:
                lost_race = isinstance(err, sa_exc.IntegrityError) or "already exists" in str(err)
                if not lost_race or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    # --- reading -------------------------------------------------------------------------------

    def get(self, key: Key) -> Record | None:
        """The record stored under ``key`` exactly, or None."""
        row = self._execute("read", sa.select(RECORDS).where(RECORDS.c.id == key.id),
                            lambda result: result.first())
        return None if row is None else self._record(row)

    def records(self, *, spec_hash: str | None = None, bucket: str | None = None,
                dtype: str | None = None, backend: str | None = None,
                target: str | None = None, id_prefix: str | None = None) -> list[Record]:
        """Records matching every given filter, oldest update first.

        ``backend`` matches ``name@version`` exactly, or every version when it has no ``@``.
        """
        query = sa.select(RECORDS).order_by(RECORDS.c.updated, RECORDS.c.id)
        for column, value in (("spec_hash", spec_hash), ("bucket", bucket), ("dtype", dtype),
                              ("target", target)):
            if value is not None:
                query = query.where(RECORDS.c[column] == value)
        if backend is not None:
            query = query.where(RECORDS.c.backend == backend if "@" in backend
                                else RECORDS.c.backend.startswith(backend + "@"))
        if id_prefix:
            query = query.where(RECORDS.c.id.startswith(id_prefix))
        records, unreadable = [], []
        for row in self._execute("read", query, lambda result: result.all()):
            try:
                records.append(self._record(row))
            except DatabaseError as err:  # one bad row must not hide (or block) all the others
                unreadable.append(str(err))
        if unreadable:
            warn(f"{len(unreadable)} unreadable record(s) skipped (kept as they are): "
                 f"{unreadable[0]}")
        return records

    # --- writing -------------------------------------------------------------------------------

    def put(self, record: Record) -> Record:
        """Insert or replace the record under its key; a replaced record keeps its ``created``.

        A stored row from a newer schema is never overwritten (DatabaseError).
        """
        def write() -> Record:
            with self.engine.begin() as conn:
                old = conn.execute(sa.select(RECORDS).where(RECORDS.c.id == record.id)).first()
                if old is None:
                    conn.execute(RECORDS.insert().values(id=record.id, **_row(record)))
                    return record
                kept = record.with_(created=self._record(old).created)
                conn.execute(RECORDS.update().where(RECORDS.c.id == record.id)
                             .values(**_row(kept)))
                return kept

        for attempt in (0, 1):
            try:
                return self._run("write", write)
            except sa_exc.IntegrityError:  # another worker inserted the same key first
                if attempt:
                    raise DatabaseError(f"{self.display}: could not write record {record.id} "
                                        "(concurrent writers kept colliding)") from None
        raise AssertionError("unreachable")

    def delete(self, ids: list[str]) -> int:
        """Delete the records with these ids; the number deleted."""
        if not ids:
            return 0
        return self._execute("write", RECORDS.delete().where(RECORDS.c.id.in_(ids)),
                             lambda result: result.rowcount)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- faults --------------------------------------------------------------------------------

    def _record(self, row) -> Record:
        where = f"{self.display}: record {row.id}"
        try:
            data = json.loads(row.body)
        except json.JSONDecodeError as err:
            raise DatabaseError(f"{where}: stored body is not JSON ({err})") from None
        return Record.from_json(data, where)

    def _check_sqlite_file(self) -> None:
        path = self.path
        if not path.exists() or path.stat().st_size == 0:
            return
        try:
            with path.open("rb") as f:
                head = f.read(len(SQLITE_MAGIC))
        except OSError as err:
            raise DatabaseError(f"tuning database {path} cannot be read: {err}") from None
        if head != SQLITE_MAGIC:
            raise DatabaseError(self._unreadable("is not a SQLite database"))

    def _unreadable(self, why: str) -> str:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        backup = self.path.with_name(f"{self.path.name}.unreadable-{stamp}")
        saved = ""
        try:
            data = self.path.read_bytes()
            same = [old for old in self.path.parent.glob(f"{self.path.name}.unreadable-*")
                    if old.stat().st_size == len(data) and old.read_bytes() == data]
            if same:  # this very content was backed up already: do not pile up copies
                backup = same[0]
            elif not backup.exists():
                shutil.copy2(self.path, backup)
            saved = f"; a copy was saved at {backup}"
        except OSError as err:
            saved = f"; no backup copy could be made ({err})"
        return (f"tuning database {self.path} {why}; it was left untouched{saved}; move it "
                "away or point --db / ATTNCC_DB elsewhere")

    def _execute(self, action: str, statement, take):
        """``take(result)`` of ``statement`` run in one connection (a transaction to write),
        through ``_run``."""
        def run():
            with self.engine.begin() if action == "write" else self.engine.connect() as conn:
                return take(conn.execute(statement))

        return self._run(action, run)

    def _run(self, action: str, fn):
        """``fn()``, retried while SQLite reports a lock (a deferred transaction that must
        upgrade to a write can be refused at once, before busy_timeout applies) until ``timeout``
        seconds have passed; then, and for any other SQLAlchemy/driver fault, one DatabaseError
        line (IntegrityError passes: the caller handles it)."""
        deadline = time.monotonic() + self.timeout
        delay = 0.01
        while True:
            try:
                return fn()
            except sa_exc.IntegrityError:
                raise
            except (sa_exc.SQLAlchemyError, ImportError) as err:
                if _locked(err) and time.monotonic() + delay < deadline:
                    time.sleep(delay * (1 + random.random()))  # noqa: S311 - jitter
                    delay = min(2 * delay, 0.5)
                    continue
                raise DatabaseError(self._fault(action, err)) from None

    def _fault(self, action: str, err: Exception) -> str:
        text = first_line(err)
        lowered = text.lower()
        if _locked(err):
            return (f"tuning database {self.display} is locked by another process (waited "
                    f"{self.timeout:g} s to {action}); retry when it is done, or raise "
                    "ATTNCC_DB_TIMEOUT")
        if self.path is not None and ("malformed" in lowered or "not a database" in lowered
                                      or "corrupt" in lowered):
            return self._unreadable(f"is damaged ({text})")
        if self.path is None and isinstance(err, sa_exc.OperationalError | sa_exc.InterfaceError):
            return (f"cannot {action} tuning database {self.display}: {text}; is the server "
                    "running and reachable?")
        if isinstance(err, ImportError | sa_exc.NoSuchModuleError):
            return _driver_message(self.url, err)
        return f"cannot {action} tuning database {self.display}: {type(err).__name__}: {text}"


def first_line(err: Exception) -> str:
    return (str(getattr(err, "orig", None) or err).strip().splitlines() or [""])[0]


def _locked(err: Exception) -> bool:
    text = first_line(err).lower()
    return "locked" in text or "busy" in text


def _row(record: Record) -> dict:
    key = record.key
    return {"spec_hash": key.spec_hash, "bucket": key.bucket, "dtype": key.dtype,
            "backend": key.backend, "target": key.target, "schema": record.schema,
            "body": record.dumps(), "updated": record.updated or now()}


def _sqlite_path(url: str) -> Path | None:
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    if not parsed.database or parsed.database == ":memory:":
        raise DatabaseError(f"tuning database {url}: expected a SQLite file path, got an "
                            "in-memory database (records would vanish with the process)")
    return Path(parsed.database)


def connect_args(url: str) -> dict:
    """The driver's connect options for ``url``: a PostgreSQL connect timeout
    (``$ATTNCC_DB_CONNECT_TIMEOUT`` seconds, default 5)."""
    if sa.engine.make_url(url).get_backend_name() == "postgresql":
        return {"connect_timeout": int(os.environ.get("ATTNCC_DB_CONNECT_TIMEOUT", 5))}
    return {}


def _driver_message(url: str, err: Exception) -> str:
    if "psycopg" in str(err) or sa.engine.make_url(url).get_backend_name() == "postgresql":
        return (f"tuning database {masked(url)} needs the psycopg driver: "
                "pip install 'attncc[postgres]'")
    return f"tuning database {masked(url)}: unusable URL ({err})"


def _insert_new(dialect: str, **row):
    """An INSERT of ``row`` into the meta table that does nothing where its name exists
    (SQLite and PostgreSQL: ON CONFLICT DO NOTHING; another dialect: a plain INSERT, whose
    IntegrityError ``_create`` takes as a lost race)."""
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        return META.insert().values(**row)
    return insert(META).values(**row).on_conflict_do_nothing(index_elements=["name"])
