"""The keyed, anchored audit log.

Every mutating service call appends one event, in the same transaction as the change it records,
so the log and the data can never disagree. The chain is tamper-evident against someone who can
write the database but not read the key:

* **Keyed.** Each event's hash is HMAC-SHA256, under a key that lives outside the database
  (``Settings.audit_key_path``: ``$SHIPYARD_HOME/keys/audit.key``, mode 0600, created on first
  use; ``SHIPYARD_AUDIT_KEY_FILE`` moves it), over its content and the previous event's hash.
  Editing an event and recomputing the rest needs the key. The key is never put in the database
  or an environment variable, and jobs launched by a server never get it.
* **Anchored.** After every commit that appended events, the head record (the last seq and its
  hash, HMAC'd) is rewritten beside the key (``audit.head``: one of two slots, in turn, so a torn
  write leaves the other; under a file lock, and only ever forwards: a writer whose seq is not
  newer than the stored one leaves it, and one that finds the event the head named gone or
  changed leaves it too, so a truncation is not re-anchored over).
  ``verify`` checks the chain against it, so deleting the newest events, or all of them, is found;
  so is a missing or forged head file, and a rolled-back one once the events it leaves
  unanchored are older than ``LAG_GRACE_S`` (the head lags the database by the moment between a
  commit and its head write; a writer that died in that moment is re-anchored by the next event).
* **Events from before the key.** A home upgraded from the unkeyed chain keeps its old events as
  they were hashed (plain SHA-256). When the key is created, the key file records the seq and
  hash of the chain's tail at that moment (``legacy_through``): events up to it are verified with
  the unkeyed formula, and pinned by that recorded hash; every later event must carry an HMAC.
  Trust in the old events is trust on first use: whatever they held when the key was made.

What it cannot find: someone who can also write the key folder can roll the database and the
head file back together to an earlier consistent state (and can read the key). Keep the key
folder to the server's user; a copy of the head shipped elsewhere (a log collector) closes that.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from shipyard.context import Context
from shipyard.domain.models import AuditEvent, AuditVerification
from shipyard.errors import InvalidStateError
from shipyard.security.rbac import require_server_admin
from shipyard.settings import ENV_AUDIT_HEAD_FILE, ENV_AUDIT_KEY_FILE
from shipyard.store import Database
from shipyard.store.engine import lock
from shipyard.store.tables import AuditEventRow, aware, utcnow

GENESIS = "0" * 64
LAG_GRACE_S = 60.0  # events this much newer than the head file are not yet anchored, not lost
AUTH_FAILURES_PER_CLIENT = 10  # recorded per client per window; the rest are counted
AUTH_FAILURES_PER_WINDOW = 100  # recorded across all clients per window
AUTH_WINDOW_S = 60.0
MAX_REASON = 200

_EVENT_DOMAIN = b"shipyard-audit-event-v1\x00"
_HEAD_DOMAIN = b"shipyard-audit-head-v1\x00"
_PENDING = "audit_pending"
_TXN = "audit_pending_transaction"
_FIRST = "audit_first"

log = logging.getLogger(__name__)


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    resource: str,
    details: dict[str, Any] | None = None,
) -> None:
    """Append an audit event inside the caller's (write) transaction.

    The head file is rewritten right after the transaction commits (never inside it).
    """
    anchor = _anchor(session)
    tail = session.info.get(_PENDING)
    if tail is not None and tail in session and session.info.get(_TXN) is session.get_transaction():
        # This transaction appended already: it holds the audit lock, so the chain's tail is
        # the event it appended last (no lock or read per event when one transaction records
        # many, as the admission pipeline's batches do).
        prev_hash = tail.hash
    else:
        lock(session, "audit")
        prev = session.scalar(
            select(AuditEventRow.hash).order_by(AuditEventRow.seq.desc()).limit(1)
        )
        prev_hash = prev or GENESIS
        tail = None
    at = utcnow()
    details = details or {}
    digest = _mac(anchor.key, prev_hash, at, actor, action, resource, details)
    row = AuditEventRow(
        at=at,
        actor=actor,
        action=action,
        resource=resource,
        details=details,
        prev_hash=prev_hash,
        hash=digest,
    )
    session.add(row)
    if _PENDING not in session.info:
        engine = session.get_bind().engine
        event.listen(session, "after_commit", lambda s: _after_commit(s, anchor, engine), once=True)
    session.info[_PENDING] = row
    session.info[_TXN] = session.get_transaction()
    if tail is None:  # the first event of this transaction: what the head must chain to
        session.info[_FIRST] = row


def record_event(
    ctx: Context, *, action: str, resource: str, details: dict[str, Any] | None = None
) -> None:
    """Append one audit event in a transaction of its own (for changes made outside the
    database, such as a blob upload)."""
    with ctx.db.transaction() as s:
        record(s, actor=ctx.actor, action=action, resource=resource, details=details)


def record_auth_failure(ctx: Context, *, reason: str, client: str | None) -> None:
    """Record a failed authentication, rate-limited so a flood cannot fill the log.

    At most ``AUTH_FAILURES_PER_CLIENT`` events per client (and ``AUTH_FAILURES_PER_WINDOW`` in
    all) per ``AUTH_WINDOW_S``; failures beyond that are counted, and the count is written as
    ``details.suppressed`` on the client's next recorded failure. ``reason`` must not hold the
    presented secret (it is cut to ``MAX_REASON`` characters).
    """
    suppressed = _auth_limiter.admit(client or "unknown")
    if suppressed is None:
        return
    details: dict[str, Any] = {"reason": reason[:MAX_REASON], "client": client}
    if suppressed:
        details["suppressed"] = suppressed
    try:
        with ctx.db.transaction() as s:
            record(
                s,
                actor="anonymous",
                action="auth.fail",
                resource=f"client/{client or 'unknown'}",
                details=details,
            )
    except Exception:  # a refusal stays a 401, even when the log cannot be written (disk full)
        log.exception("could not record a failed authentication from %s", client)


def list_events(session: Session, *, limit: int = 100, after: int = 0) -> list[AuditEvent]:
    rows = session.scalars(
        select(AuditEventRow)
        .where(AuditEventRow.seq > after)
        .order_by(AuditEventRow.seq)
        .limit(limit)
    )
    return [_to_domain(r) for r in rows]


def list_audit_events(ctx: Context, *, after: int = 0, limit: int = 100) -> list[AuditEvent]:
    """Audit events with ``seq > after``, oldest first: the service behind ``GET /audit``
    (server admins only)."""
    require_server_admin(ctx, what="reading the audit log")
    with ctx.db.read() as s:
        return list_events(s, after=after, limit=limit)


def verify_audit_chain(ctx: Context, *, lag_grace_s: float = LAG_GRACE_S) -> AuditVerification:
    """Check the whole chain against the key and the head anchor: the service behind
    ``GET /audit/verify`` and ``shipyard audit verify`` (server admins only)."""
    require_server_admin(ctx, what="verifying the audit log")
    with ctx.db.read() as s:
        return verify(s, lag_grace_s=lag_grace_s)


def verify_chain(session: Session, *, lag_grace_s: float = LAG_GRACE_S) -> int | None:
    """Return the seq of the first bad event (altered, removed, reordered, or missing from the
    end), or None when the whole chain holds."""
    report = verify(session, lag_grace_s=lag_grace_s)
    return None if report.ok else report.first_bad_seq


def verify(session: Session, *, lag_grace_s: float = LAG_GRACE_S) -> AuditVerification:
    """Walk the chain, oldest first, and check it against the key and the head anchor."""
    anchor = _anchor(session)
    key = anchor.key
    head = _read_head(anchor)
    events = 0
    prev_hash = GENESIS
    last_seq = 0
    first_unanchored: AuditEventRow | None = None
    head_seen = False
    legacy = anchor.legacy_through

    def bad(seq: int, problem: str) -> AuditVerification:
        return AuditVerification(
            ok=False,
            events=events,
            first_bad_seq=seq,
            problem=problem,
            head_seq=head.seq if head else None,
            legacy_through=legacy,
        )

    walk = select(AuditEventRow).order_by(AuditEventRow.seq).execution_options(yield_per=1000)
    for row in session.scalars(walk):  # streamed: a long log is not held in memory
        at = aware(row.at)
        assert at is not None
        if row.seq <= legacy:
            expected = _hash(prev_hash, at, row.actor, row.action, row.resource, row.details)
        else:
            expected = _mac(key, prev_hash, at, row.actor, row.action, row.resource, row.details)
        if row.prev_hash != prev_hash or not hmac.compare_digest(row.hash, expected):
            return bad(
                row.seq,
                f"event {row.seq} does not match its hash or its predecessor: altered, "
                "removed, reordered, or hashed under another key",
            )
        if row.seq == legacy and not hmac.compare_digest(row.hash, anchor.legacy_hash):
            return bad(row.seq, "not the event the key file pinned: older events were changed")
        if head is not None:
            if row.seq == head.seq:
                head_seen = True
                if not hmac.compare_digest(row.hash, head.hash):
                    return bad(row.seq, "not the event the head anchor names: it was replaced")
            elif row.seq > head.seq and first_unanchored is None:
                first_unanchored = row
        events += 1
        prev_hash = row.hash
        last_seq = row.seq
    if legacy and last_seq < legacy:
        return bad(last_seq + 1, f"missing: the chain ends at {last_seq}, the key pins {legacy}")
    if head is None:
        return bad(
            legacy + 1,
            f"the head anchor {anchor.head_file} is missing or not signed with the key "
            "(so truncation cannot be ruled out); restore it from a backup",
        )
    if head.seq > last_seq or (head.seq > legacy and not head_seen):
        return bad(
            last_seq + 1,
            f"missing: the head anchor names event {head.seq} but the chain ends at {last_seq} "
            "(events deleted, or lost in a power failure)",
        )
    if first_unanchored is not None:
        age = (utcnow() - aware(first_unanchored.at)).total_seconds()  # type: ignore[operator]
        if age > lag_grace_s:
            return bad(
                first_unanchored.seq,
                f"past the head anchor ({head.seq}) for {age:.0f}s: the head file was rolled "
                "back, or a writer died before anchoring (the next event re-anchors)",
            )
    return AuditVerification(
        ok=True,
        events=events,
        first_bad_seq=None,
        problem=None,
        head_seq=head.seq,
        legacy_through=legacy,
    )


# --- the key, the head file --------------------------------------------------------------------


@dataclass(frozen=True)
class _Anchor:
    key: bytes
    legacy_through: int  # events up to this seq predate the key and carry plain SHA-256 hashes
    legacy_hash: str
    key_file: Path
    head_file: Path


@dataclass(frozen=True)
class _Head:
    seq: int
    hash: str


_anchors: dict[tuple[Path, Path], _Anchor] = {}
_anchors_lock = threading.Lock()


def _anchor(session: Session) -> _Anchor:
    """The key and head files of this session's database: loaded once per process, and created
    (with the checkpoint of the chain's tail) the first time any process uses them."""
    files = _files(session)
    with _anchors_lock:
        found = _anchors.get(files)
        if found is None:
            found = _anchors[files] = _load_or_create(session, *files)
        return found


def _files(session: Session) -> tuple[Path, Path]:
    db = session.info.get("database")
    files = db.info.get("audit_files") if isinstance(db, Database) else None
    if files is not None:
        return files  # type: ignore[no-any-return]
    # A database opened without a Context (a tool, a test): the same places a Context would use.
    env_key = os.environ.get(ENV_AUDIT_KEY_FILE)
    if env_key:
        key = Path(env_key).expanduser().absolute()
    else:
        url = make_url(str(session.get_bind().engine.url))
        if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
            raise InvalidStateError(
                "this database has no audit key configured: open it through "
                f"shipyard.context.open_context, or set {ENV_AUDIT_KEY_FILE}",
                field=ENV_AUDIT_KEY_FILE,
            )
        key = Path(url.database).absolute().parent / "keys" / "audit.key"
    env_head = os.environ.get(ENV_AUDIT_HEAD_FILE)
    head = Path(env_head).expanduser().absolute() if env_head else key.with_name("audit.head")
    return key, head


def _load_or_create(session: Session, key_file: Path, head_file: Path) -> _Anchor:
    loaded = _load_key(key_file, head_file)
    if loaded is not None:
        return loaded
    with _file_lock(head_file):
        loaded = _load_key(key_file, head_file)  # another process may have made it meanwhile
        if loaded is not None:
            return loaded
        if head_file.exists():
            raise InvalidStateError(
                f"the audit key {key_file} is missing but its head anchor {head_file} exists: "
                "the key was deleted or moved; restore it (the chain cannot be verified without "
                f"it), or point {ENV_AUDIT_KEY_FILE} at it",
                field=ENV_AUDIT_KEY_FILE,
            )
        newest = select(AuditEventRow.seq, AuditEventRow.hash).order_by(AuditEventRow.seq.desc())
        tail = session.execute(newest.limit(1)).first()
        seq, digest = (int(tail[0]), str(tail[1])) if tail else (0, GENESIS)
        anchor = _Anchor(
            key=secrets.token_bytes(32),
            legacy_through=seq,
            legacy_hash=digest,
            key_file=key_file,
            head_file=head_file,
        )
        content = {
            "version": 1,
            "key": anchor.key.hex(),
            "legacy_through": seq,
            "legacy_hash": digest,
            "created_at": utcnow().isoformat(),
        }
        _write_new(key_file, json.dumps(content).encode())
        _create_head(anchor, _Head(seq=seq, hash=digest))
        log.info("created the audit key %s (events up to %d predate it)", key_file, seq)
        return anchor


def _load_key(key_file: Path, head_file: Path) -> _Anchor | None:
    try:
        raw = key_file.read_bytes()
    except FileNotFoundError:
        return None
    try:
        content = json.loads(raw)
        key = bytes.fromhex(content["key"])
        legacy_through = int(content["legacy_through"])
        legacy_hash = str(content["legacy_hash"])
    except (ValueError, KeyError, TypeError):
        raise InvalidStateError(
            f"the audit key file {key_file} is not a shipyard audit key: restore it from a backup",
            field=ENV_AUDIT_KEY_FILE,
        ) from None
    if len(key) < 32:
        raise InvalidStateError(
            f"the audit key in {key_file} is shorter than 32 bytes", field=ENV_AUDIT_KEY_FILE
        )
    return _Anchor(
        key=key,
        legacy_through=legacy_through,
        legacy_hash=legacy_hash,
        key_file=key_file,
        head_file=head_file,
    )


# The head file holds two fixed-size slots, rewritten in place and in turn (never the slot with
# the newest head): a torn write spoils at most the slot being written, and the other still holds
# a signed, older head. In place rather than temp+rename: on ext4 a rename over a file flushes
# it to disk, ~7 ms per audited change here; a pwrite costs microseconds.
_SLOT = 256


def _read_head(anchor: _Anchor) -> _Head | None:
    """The newest signed head; None when the file is missing or no slot is signed with our key."""
    newest = _newest_slot(anchor)
    return newest[0] if newest else None


def _newest_slot(anchor: _Anchor) -> tuple[_Head, int] | None:
    try:
        data = anchor.head_file.read_bytes()
    except OSError:
        return None
    found: list[tuple[_Head, int]] = []
    for index in range(2):
        try:
            content = json.loads(data[index * _SLOT : (index + 1) * _SLOT])
            head = _Head(seq=int(content["seq"]), hash=str(content["hash"]))
            mac = str(content["mac"])
        except (ValueError, KeyError, TypeError, IndexError):
            continue
        if hmac.compare_digest(mac, _head_mac(anchor.key, head)):
            found.append((head, index))
    return max(found, key=lambda pair: pair[0].seq) if found else None


def _slot(anchor: _Anchor, head: _Head) -> bytes:
    content = {"version": 1, "seq": head.seq, "hash": head.hash, "mac": _head_mac(anchor.key, head)}
    return json.dumps(content).encode().ljust(_SLOT - 1) + b"\n"


def _create_head(anchor: _Anchor, head: _Head) -> None:
    _write_new(anchor.head_file, _slot(anchor, head) * 2)


def _write_slot(anchor: _Anchor, index: int, head: _Head) -> None:
    fd = os.open(anchor.head_file, os.O_WRONLY)  # never re-created here: a missing head stays so
    try:
        os.pwrite(fd, _slot(anchor, head), index * _SLOT)
    finally:
        os.close(fd)


def _after_commit(session: Session, anchor: _Anchor, engine: Engine) -> None:
    """Move the head anchor forward to the event just committed (outside the transaction).

    Never raises: the change is committed already. Under the file lock, the head moves only
    forward, and only when the event it last named is still in the chain as it was: after a
    truncation the head stays where it was, so the tampering stays visible.
    """
    row = session.info.pop(_PENDING, None)
    session.info.pop(_TXN, None)
    first = session.info.pop(_FIRST, row)
    if row is None:
        return
    new = _Head(seq=int(row.seq), hash=str(row.hash))
    try:
        with _file_lock(anchor.head_file):
            newest = _newest_slot(anchor)
            if newest is None:
                log.warning(
                    "audit head %s is missing or forged; not rewriting it (verify reports it)",
                    anchor.head_file,
                )
                return
            stored, index = newest
            if new.seq <= stored.seq:
                return  # a later writer anchored already
            # this transaction's events chain straight on from the stored head (it read that
            # hash under the audit lock): the event the head names is still there
            follows = (
                first is not None
                and int(first.seq) == stored.seq + 1
                and first.prev_hash == stored.hash
            )
            if not follows and stored.seq > 0 and not _still_there(engine, stored):
                log.warning(
                    "audit event %d named by the head anchor is gone or changed; "
                    "not moving the head (verify reports it)",
                    stored.seq,
                )
                return
            _write_slot(anchor, 1 - index, new)
    except Exception:  # the change is committed: never fail the caller; the next append retries
        log.exception("could not write the audit head anchor %s", anchor.head_file)


def _still_there(engine: Engine, head: _Head) -> bool:
    with Database(engine).read() as s:
        current = s.scalar(select(AuditEventRow.hash).where(AuditEventRow.seq == head.seq))
    return current is not None and hmac.compare_digest(current, head.hash)


@contextlib.contextmanager
def _file_lock(beside: Path) -> Iterator[None]:
    """An exclusive lock across processes, on ``<beside>.lock``."""
    beside.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(beside.with_name(beside.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write_new(path: Path, data: bytes) -> None:
    """Write ``path`` once, whole, mode 0600; fails if it exists (a link, not a rename)."""
    tmp = _temp_with(path, data)
    try:
        os.link(tmp, path)
    finally:
        os.unlink(tmp)


def _temp_with(path: Path, data: bytes) -> str:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp: 0600
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    return tmp


# --- hashes ------------------------------------------------------------------------------------


def _payload(
    prev_hash: str, at: datetime, actor: str, action: str, resource: str, details: dict[str, Any]
) -> bytes:
    return json.dumps(
        [prev_hash, aware(at).isoformat(timespec="microseconds"), actor, action, resource, details],  # type: ignore[union-attr]
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    ).encode()


def _hash(
    prev_hash: str, at: datetime, actor: str, action: str, resource: str, details: dict[str, Any]
) -> str:
    """The unkeyed formula of events recorded before the key existed (plain SHA-256)."""
    return hashlib.sha256(_payload(prev_hash, at, actor, action, resource, details)).hexdigest()


def _mac(
    key: bytes,
    prev_hash: str,
    at: datetime,
    actor: str,
    action: str,
    resource: str,
    details: dict[str, Any],
) -> str:
    message = _EVENT_DOMAIN + _payload(prev_hash, at, actor, action, resource, details)
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def _head_mac(key: bytes, head: _Head) -> str:
    message = _HEAD_DOMAIN + json.dumps([head.seq, head.hash]).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def _to_domain(row: AuditEventRow) -> AuditEvent:
    at = aware(row.at)
    assert at is not None
    return AuditEvent(
        seq=row.seq,
        at=at,
        actor=row.actor,
        action=row.action,
        resource=row.resource,
        details=row.details,
        prev_hash=row.prev_hash,
        hash=row.hash,
    )


# --- failed authentication, rate-limited -------------------------------------------------------


class _AuthLimiter:
    """Fixed one-minute windows per client, plus a cap across all clients."""

    MAX_CLIENTS = 4096

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._clients: dict[str, list[float]] = {}  # client -> [window start, recorded, suppressed]
        self._window = (0.0, 0)  # start, recorded across all clients

    def admit(self, client: str) -> int | None:
        """None: suppress this one (counted); else record it, with this many suppressed before."""
        now = self._clock()
        with self._lock:
            if now - self._window[0] >= AUTH_WINDOW_S:
                self._window = (now, 0)
            state = self._clients.get(client)
            if state is None:
                if len(self._clients) >= self.MAX_CLIENTS:
                    self._forget_idle(now)
                state = self._clients[client] = [now, 0, 0]
            elif now - state[0] >= AUTH_WINDOW_S:
                state[0], state[1] = now, 0
            if state[1] >= AUTH_FAILURES_PER_CLIENT or self._window[1] >= AUTH_FAILURES_PER_WINDOW:
                state[2] += 1
                return None
            state[1] += 1
            self._window = (self._window[0], self._window[1] + 1)
            suppressed, state[2] = int(state[2]), 0
            return suppressed

    def _forget_idle(self, now: float) -> None:
        for name, state in list(self._clients.items()):
            if now - state[0] >= AUTH_WINDOW_S and not state[2]:
                del self._clients[name]


_auth_limiter = _AuthLimiter()
