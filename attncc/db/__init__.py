"""[8] The tuning database: records keyed by spec, shape bucket, dtype, backend and target.

``Store`` (store.py) holds records in SQLite or PostgreSQL through SQLAlchemy; ``exchange`` reads
and writes JSONL and the shipped ``tuning_db/`` layer; ``lookup.find`` picks the record a compile
uses. See key.py for what a key and a record hold.
"""

from attncc.db.exchange import export, import_, read, shipped
from attncc.db.key import SCHEMA_VERSION, DatabaseError, Key, Record, bucket_of
from attncc.db.lookup import find
from attncc.db.store import Store, resolve, study_storage

__all__ = ["SCHEMA_VERSION", "DatabaseError", "Key", "Record", "Store", "bucket_of", "export",
           "find", "import_", "read", "resolve", "shipped", "study_storage"]
