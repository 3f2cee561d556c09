"""The one place where errors become HTTP responses.

Every error the API returns has one JSON shape, ``{"code", "message", "field"?, "details"?}``, so
the SDK can turn it back into the exception a service raised (``errors.error_from_dict``) whether
the error came from a service, from request validation, from the body-size guard, from routing or
from a bug. Unexpected exceptions answer 500 ``internal`` with an error id that is also in the
server log; their text never reaches the client.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shipyard.errors import (
    AuthenticationError,
    InvalidInputError,
    PayloadTooLargeError,
    ShipyardError,
    storage_fault,
)

log = logging.getLogger("shipyard.server")

# Codes for errors that Starlette raises itself (routing, methods); they match errors.py's codes
# where one exists so the SDK raises the matching class.
_HTTP_CODES = {
    400: "invalid_input",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_input",
}


class DigestMismatchError(InvalidInputError):
    """Uploaded content whose BLAKE3 hash differs from the digest it was sent under.

    A client error (400) with the stable ``invalid_input`` code: the SDK raises
    :class:`InvalidInputError` for it. (``IntegrityError`` is for stored content gone bad: a 500.)
    """

    http_status = 400


def error_body(exc: ShipyardError) -> dict[str, Any]:
    return exc.to_dict()


def error_response(exc: ShipyardError, *, headers: dict[str, str] | None = None) -> JSONResponse:
    if exc.http_status >= 500:
        log.error("%s: %s", exc.code, exc.message)
    if isinstance(exc, AuthenticationError):
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse(error_body(exc), status_code=exc.http_status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on ``app`` (the catch-all is :class:`InternalErrorMiddleware`)."""
    app.add_exception_handler(ShipyardError, _shipyard_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]


async def _shipyard_error(request: Request, exc: ShipyardError) -> JSONResponse:
    return error_response(exc)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if bad_json is not None:
        reason = (bad_json.get("ctx") or {}).get("error", "invalid JSON")
        position = bad_json["loc"][-1] if len(bad_json.get("loc", ())) > 1 else "?"
        body: dict[str, Any] = {
            "code": InvalidInputError.code,
            "message": f"the request body is not valid JSON: {reason} (at character {position})",
            "field": "body",
        }
        return JSONResponse(body, status_code=400)
    described = [_describe(e) for e in errors]
    first = described[0] if described else {"field": "body"}
    message = "; ".join(f"{d['loc']}: {d['msg']}" for d in described[:10])
    if len(described) > 10:
        message += f"; and {len(described) - 10} more"
    body = {
        "code": InvalidInputError.code,
        "message": f"invalid request: {message}",
        "field": first["field"],
        "details": {"errors": described},
    }
    return JSONResponse(body, status_code=422)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    # FastAPI wraps any failure while reading a JSON body into "400 error parsing the body";
    # the body-size guard is one such failure, and deserves its own 413.
    cause = exc.__cause__
    if isinstance(cause, ShipyardError):
        return error_response(cause)
    status = exc.status_code
    if status == 404:
        message = (
            f"nothing here answers {request.method} {request.url.path}; "
            "see /docs for the routes this server offers"
        )
    elif status == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    body = {"code": _HTTP_CODES.get(status, "http_error"), "message": message}
    return JSONResponse(body, status_code=status, headers=getattr(exc, "headers", None))


def _describe(error: dict[str, Any]) -> dict[str, Any]:
    loc: Sequence[Any] = error.get("loc") or ("body",)
    source, inner = str(loc[0]), ".".join(str(p) for p in loc[1:])
    label = (inner or "body") if source == "body" else f"{source} parameter {inner!r}"
    kind = error.get("type")
    msg = str(error.get("msg", "invalid"))
    if kind == "missing" and source == "body" and not inner:
        msg = "a JSON request body is required"
    elif kind == "extra_forbidden":
        msg = "unknown field; only the documented fields are accepted"
    return {"loc": label, "field": inner or source, "msg": msg, "type": kind}


class InternalErrorMiddleware:
    """Turn an unexpected exception into a 500 ``internal`` JSON error without its details.

    Starlette's own last-resort handler re-raises after answering; this one answers and logs with
    an error id the operator can find, and only re-raises when the response had already started
    (the client then sees a truncated response, never a wrong one).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise
            if isinstance(exc, ShipyardError):  # raised by a middleware, outside the handlers
                response = error_response(exc)
            elif (fault := storage_fault(exc)) is not None:
                # a full disk (507) or a read-only one (503) under the uploads folder or the
                # database: the client can tell it from a bug, and retry later
                response = error_response(fault)
            else:
                error_id = uuid.uuid4().hex[:12]
                log.exception(
                    "unexpected error %s on %s %s", error_id, scope.get("method"), scope.get("path")
                )
                response = JSONResponse(
                    {
                        "code": "internal",
                        "message": "the server hit an unexpected error; the operator can find "
                        f"it in the server log under error id {error_id}",
                        "details": {"error_id": error_id},
                    },
                    status_code=500,
                )
            await response(scope, receive, send)


__all__ = [
    "DigestMismatchError",
    "InternalErrorMiddleware",
    "PayloadTooLargeError",
    "error_response",
    "install_error_handlers",
]
