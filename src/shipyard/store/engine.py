"""Engine factory and transactions.

SQLite: WAL mode, a busy timeout, foreign keys on, and ``BEGIN IMMEDIATE`` for write
transactions, so that many processes (CLI, server, job supervisors, jobs logging metrics) writing
the same file queue on the lock instead of failing with "database is locked" when a deferred
reader tries to upgrade. PostgreSQL: plain transactions; critical sections lock a ``locks`` row.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import Engine, create_engine, event, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError, NoSuchModuleError
from sqlalchemy.orm import Session

from shipyard.errors import InvalidInputError
from shipyard.store.tables import LockRow
from shipyard.wiring import database_driver

_WRITE = "shipyard_write"


class Database:
    """A connection factory. Cheap to build; ``open_database`` migrates the schema first."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"
        # What upper layers attach to this database (the audit chain's key and head files);
        # every session sees it as ``session.info["database"].info``.
        self.info: dict[str, Any] = {}

    @contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[Session]:
        """A session in one transaction, committed on success and rolled back on error."""
        with self.engine.connect() as conn:
            # conn.info lives as long as the pooled DBAPI connection: reset it, so that a later
            # plain engine.connect()/begin() on this connection gets the default (IMMEDIATE).
            conn.info[_WRITE] = write
            try:
                with (
                    Session(
                        bind=conn, expire_on_commit=False, autoflush=True, info={"database": self}
                    ) as session,
                    session.begin(),
                ):
                    yield session
            finally:
                conn.info.pop(_WRITE, None)

    def read(self) -> Any:
        return self.transaction(write=False)

    def close(self) -> None:
        self.engine.dispose()


def lock(session: Session, name: str, *, holder: str = "") -> None:
    """Serialise a critical section across processes: every writer updates the same row first.

    On SQLite the write transaction already holds the database lock; on PostgreSQL the updated
    row stays locked until the transaction ends.
    """
    values = {"holder": holder or f"pid:{os.getpid()}", "acquired_at": time.time()}
    claim = update(LockRow).where(LockRow.name == name).values(**values)
    if session.execute(claim).rowcount:  # type: ignore[attr-defined]
        return
    # First use of this name. Two writers can both get here; a plain INSERT would fail the
    # second with a unique violation on PostgreSQL, so insert-if-absent (which waits for the
    # other's commit there) and then claim the row like everyone else.
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    session.execute(insert(LockRow).values(name=name, **values).on_conflict_do_nothing())
    session.execute(claim)


_cache: dict[str, Database] = {}
_cache_lock = threading.Lock()


def open_database(url: str, *, migrate: bool = True) -> Database:
    """Build (once per URL and process) a Database for ``url`` and bring its schema up to date."""
    with _cache_lock:
        db = _cache.get(url)
        if db is not None:
            return db
        db = Database(_make_engine(url))
        if migrate:
            from shipyard.store.migrate import upgrade  # alembic is heavy: load it only here

            upgrade(db.engine)
        _cache[url] = db
        return db


def forget_database(url: str) -> None:
    """Drop a cached Database (tests that delete a home use this)."""
    with _cache_lock:
        db = _cache.pop(url, None)
    if db is not None:
        db.close()


def _make_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise InvalidInputError(f"database URL {url!r} is not valid: {exc}", field="db") from None
    shown = parsed.render_as_string(hide_password=True)  # never echo a password into errors
    options: dict[str, Any]
    if database_driver(parsed.get_backend_name()) is None:  # shipyard.wiring's table
        raise InvalidInputError(
            f"database URL {shown!r}: only sqlite:/// and postgresql:// are supported", field="db"
        )
    if parsed.get_backend_name() == "sqlite":
        options = {"connect_args": {"timeout": 60, "check_same_thread": False}}
        if parsed.database and parsed.database != ":memory:":
            database = parsed.database
            options = {"creator": lambda: _connect_sqlite(database)}
    elif parsed.get_backend_name() == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername=database_driver("postgresql"))
        options = {"pool_pre_ping": True}
    else:
        raise InvalidInputError(
            f"database URL {shown!r}: only sqlite:/// and postgresql:// are supported", field="db"
        )
    try:
        # The URL object, not str(url): str() masks the password as '***'.
        engine = create_engine(parsed, **options)
    except (NoSuchModuleError, ImportError) as exc:
        raise InvalidInputError(
            f"database URL {shown!r}: its driver is not available ({exc}); for PostgreSQL "
            "use postgresql:// and install the extra: pip install 'shipyard[postgres]'",
            field="db",
        ) from None
    if parsed.get_backend_name() == "sqlite":
        # only once the URL is known good: a refused URL must leave no file behind
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            _make_private(Path(parsed.database))
        _configure_sqlite(engine)
    return engine


def _make_private(path: Path) -> None:
    """Create the SQLite file (and chmod its WAL and shared-memory files) readable by our user
    only: SQLite gives the -wal and -shm files the database file's mode."""
    with suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        with suppress(OSError):
            if name.stat().st_uid == os.geteuid():
                os.chmod(name, 0o600)


class _ReadOnlyConnection(sqlite3.Connection):
    """A connection opened read-only because the disk is full (see ``_connect_sqlite``)."""


# A WAL database needs its shared-memory file sized before the first read; on a full disk that
# fails, whether or not the connection would only read.
_NO_ROOM_ON_OPEN = frozenset({"SQLITE_IOERR_SHMSIZE", "SQLITE_IOERR_SHMOPEN", "SQLITE_FULL"})
_READ_ONLY_AT = "shipyard_read_only_at"
_READ_ONLY_TTL_S = 1.0  # a pooled read-only connection is replaced (disk re-tried) after this


def _connect_sqlite(path: str) -> sqlite3.Connection:
    """Open ``path``; on a full disk, open it read-only so that reads keep working.

    With no room for the WAL's shared-memory file, even a read fails. Then no other process has
    the database open (it would hold that file, already sized), so the file is complete as it is
    and is opened ``immutable``: reads work, every write is refused (SQLITE_READONLY, which the
    CLI and the API report as a storage fault), and the next connection, once there is room
    again, is a normal one.
    """
    conn = sqlite3.connect(path, timeout=60, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode").fetchone()
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorname", "") not in _NO_ROOM_ON_OPEN:
            conn.close()
            raise
        conn.close()
        uri = f"file:{quote(path)}?mode=ro&immutable=1"
        return sqlite3.connect(
            uri, uri=True, timeout=60, check_same_thread=False, factory=_ReadOnlyConnection
        )
    return conn


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves, below
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=60000")
        if isinstance(dbapi_connection, _ReadOnlyConnection):
            cursor.execute("PRAGMA query_only=ON")
            cursor.close()
            _record.info[_READ_ONLY_AT] = time.monotonic()
            return
        _ensure_wal(cursor)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "checkout")
    def _on_checkout(_dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        # An immutable connection neither writes nor sees others' writes: a long-lived process
        # (the server) must not keep one once there is room again, so it is short-lived.
        since = record.info.get(_READ_ONLY_AT)
        if since is not None and time.monotonic() - since > _READ_ONLY_TTL_S:
            raise DisconnectionError("a read-only (full disk) connection: try a normal one")

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        write = conn.info.get(_WRITE, True)
        if isinstance(conn.connection.dbapi_connection, _ReadOnlyConnection):
            write = False  # a full disk: read, and let a write fail on its first statement
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _ensure_wal(cursor: Any, *, attempts: int = 50) -> None:
    """Put the file in WAL mode (it persists, so this is a no-op after the first connection).

    Switching needs an exclusive lock, and SQLite can answer BUSY at once - without calling the
    busy handler - when several processes open a new home together; retry with a short backoff.
    """
    for attempt in range(attempts):
        try:
            if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
                return
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(min(0.01 * (attempt + 1), 0.2))
