"""Run the alembic migrations programmatically (never in a constructor: ``open_database`` calls
this once per process and URL)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

MIGRATIONS = Path(__file__).parent / "migrations"
# Any fixed 64-bit number; names this lock among the server's advisory locks.
_PG_LOCK_KEY = 0x5348495059415244  # "SHIPYARD"


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def upgrade(engine: Engine) -> None:
    """Bring the schema to head; safe when several processes open a new database at once.

    The first one to take the migration lock migrates; the others wait for it and then find the
    schema already at head (on SQLite the write transaction's ``BEGIN IMMEDIATE`` is that lock; on
    PostgreSQL, whose DDL is transactional too, a transaction-scoped advisory lock).
    """
    head = head_revision()
    if current_revision(engine) == head:
        return
    cfg = alembic_config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        if MigrationContext.configure(conn).get_current_revision() == head:
            return  # another process migrated while we waited for the lock
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
