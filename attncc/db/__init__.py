"""[8] The tuning database: records keyed by spec, shape bucket, dtype, backend and target.

``key.py``: what a key and a record hold; ``store.py``: ``Store``, records in SQLite or PostgreSQL
through SQLAlchemy; ``exchange.py``: JSONL import/export and the shipped ``tuning_db/`` layer;
``lookup.py``: ``lookup``/``find``, the record a compile uses. Only ``store.py`` needs SQLAlchemy,
so this package re-exports nothing: import from the module.
"""
