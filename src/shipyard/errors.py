"""One exception hierarchy for the whole platform.

Services raise these; the server maps them to HTTP in one place (``server/errors.py``) and the SDK
maps HTTP errors back to the same classes, so a caller sees the same exception whether it talks to
a server or to the embedded home. Every error carries a stable machine-readable ``code``.
"""

from __future__ import annotations

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
    )
}


def error_from_dict(body: dict[str, Any], *, status: int) -> ShipyardError:
    """Rebuild the exception a server raised, from its JSON error body."""
    cls = ERRORS_BY_CODE.get(str(body.get("code", "")), ShipyardError)
    message = str(body.get("message") or f"server answered HTTP {status}")
    details = body.get("details") or {}
    return cls(message, field=body.get("field"), **details)
