"""Metadata store: SQLAlchemy 2 tables, engine factory and alembic migrations.

SQLite (WAL) for the embedded home, PostgreSQL for teams; nothing here uses SQL that only one of
them speaks.
"""

from shipyard.store.engine import Database, open_database

__all__ = ["Database", "open_database"]
