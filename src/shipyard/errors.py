"""One exception hierarchy for the whole platform.

Services raise these; the server maps them to HTTP in one place (``server/errors.py``) and the SDK
maps HTTP errors back to the same classes, so a caller sees the same exception whether it talks to
a server or to the embedded home. Every error carries a stable machine-readable ``code``.
"""

from __future__ import annotations

import errno
from typing import Any, ClassVar


class ShipyardError(Exception):
    """Base class. ``code`` is stable API; ``message`` says what went wrong and what to do."""

    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str, *, field: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        if self.details:
            body["details"] = self.details
        return body


class InvalidInputError(ShipyardError):
    code = "invalid_input"
    http_status = 422


class UnsafePathError(InvalidInputError):
    """A user-supplied path or name would escape its root."""

    code = "unsafe_path"
    http_status = 400


class NotFoundError(ShipyardError):
    code = "not_found"
    http_status = 404


class ConflictError(ShipyardError):
    code = "conflict"
    http_status = 409


class InvalidStateError(ConflictError):
    """An action that the resource's current state does not allow (e.g. cancel a finished job)."""

    code = "invalid_state"


class AuthenticationError(ShipyardError):
    code = "unauthenticated"
    http_status = 401


class PermissionDeniedError(ShipyardError):
    code = "permission_denied"
    http_status = 403


class PayloadTooLargeError(InvalidInputError):
    code = "payload_too_large"
    http_status = 413


class IntegrityError(ShipyardError):
    """Stored content does not match its recorded hash."""

    code = "integrity_error"
    http_status = 500


class ResourceUnavailableError(ShipyardError):
    """A request that can never be satisfied on this machine (e.g. more GPUs than exist)."""

    code = "resource_unavailable"
    http_status = 422


class BackendError(ShipyardError):
    """A process or backend we depend on failed (replica did not start, executor error)."""

    code = "backend_error"
    http_status = 502


class StorageFullError(ShipyardError):
    """The disk (or quota) under the store is full: nothing was written; free space, retry."""

    code = "storage_full"
    http_status = 507


class StorageUnavailableError(ShipyardError):
    """The store cannot be written (a read-only or inaccessible folder); reads may still work."""

    code = "storage_unavailable"
    http_status = 503


ERRORS_BY_CODE: dict[str, type[ShipyardError]] = {
    cls.code: cls
    for cls in (
        ShipyardError,
        InvalidInputError,
        UnsafePathError,
        NotFoundError,
        ConflictError,
        InvalidStateError,
        AuthenticationError,
        PermissionDeniedError,
        PayloadTooLargeError,
        IntegrityError,
        ResourceUnavailableError,
        BackendError,
        StorageFullError,
        StorageUnavailableError,
    )
}


def error_from_dict(body: dict[str, Any], *, status: int) -> ShipyardError:
    """Rebuild the exception a server raised, from its JSON error body."""
    cls = ERRORS_BY_CODE.get(str(body.get("code", "")), ShipyardError)
    message = str(body.get("message") or f"server answered HTTP {status}")
    details = body.get("details") or {}
    return cls(message, field=body.get("field"), **details)


_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_READ_ONLY_ERRNOS = frozenset({errno.EROFS})
_DENIED_ERRNOS = frozenset({errno.EACCES, errno.EPERM})


def storage_write_error(exc: OSError, *, where: str) -> ShipyardError | None:
    """The clean error for an ``OSError`` hit while *writing* to a store at ``where``.

    A full disk or quota (``ENOSPC``, ``EDQUOT``, ``EFBIG``) is :class:`StorageFullError` (507);
    a read-only file system or a folder the process may not write (``EROFS``, ``EACCES``,
    ``EPERM``) is :class:`StorageUnavailableError` (503). ``None`` for any other fault.
    """
    code = exc.errno
    name = errno.errorcode.get(code, str(code)) if code is not None else "?"
    if code in _FULL_ERRNOS:
        return StorageFullError(
            f"no space left on the device under {where}: nothing was stored; free some space "
            "('shipyard gc' reclaims unreferenced blobs) and try again",
            field="storage",
            errno=name,
        )
    if code in _READ_ONLY_ERRNOS or code in _DENIED_ERRNOS:
        why = "read-only file system" if code in _READ_ONLY_ERRNOS else "permission denied"
        return StorageUnavailableError(
            f"{where} cannot be written ({why}): nothing was stored; reads still work. Make it "
            "writable (remount it read-write, fix its owner) and try again",
            field="storage",
            errno=name,
        )
    return None


def storage_fault(exc: BaseException, *, where: str = "the store") -> ShipyardError | None:
    """The clean error for a storage fault anywhere in ``exc``'s chain, else ``None``.

    For faults raised outside the stores' own write paths (the upload folder, the metadata
    database, a job folder): a full disk (``ENOSPC``, ``EDQUOT``, ``EFBIG``, SQLite's
    ``SQLITE_FULL``) is :class:`StorageFullError` (507); a read-only file system (``EROFS``,
    SQLite's ``SQLITE_READONLY``) is :class:`StorageUnavailableError` (503). A plain
    permission error is not mapped here: it may be a read of the caller's own file.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, (StorageFullError, StorageUnavailableError)):
            return current
        if isinstance(current, OSError) and (
            current.errno in _FULL_ERRNOS or current.errno in _READ_ONLY_ERRNOS
        ):
            target = str(current.filename) if current.filename else where
            return storage_write_error(current, where=target)
        name = getattr(current, "sqlite_errorname", None)
        if isinstance(name, str) and name.startswith("SQLITE_FULL"):
            return StorageFullError(
                "the metadata database's disk is full: nothing was stored; free some space "
                "and try again (reads still work)",
                field="storage",
                errno=name,
            )
        if isinstance(name, str) and name.startswith("SQLITE_READONLY"):
            return StorageUnavailableError(
                f"the metadata database cannot be written ({name}: its disk is full or "
                "read-only): nothing was stored; reads still work. Free some space or make its "
                "folder writable, and try again",
                field="storage",
                errno=name,
            )
        todo.extend((current.__cause__, current.__context__, getattr(current, "orig", None)))
    return None
