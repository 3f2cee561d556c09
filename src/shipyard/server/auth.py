"""Who is calling: bearer-token authentication for every route but ``/healthz``.

When auth is on, a request without a valid ``Authorization: Bearer <token>`` gets a 401 JSON error
before any route (or body read) runs; an expired or revoked token gets one that says so and where
to get another. A valid token's principal (a user, service account or job, with its roles per
project and the token's narrowing) is put on the request and flows into the service context:
the services authorise it, and audit events name it (``user:alice``). When auth is off every
caller is the local user, server admin, ``local`` - only safe on a loopback address (``serve``
refuses otherwise). There is no default token or password: tokens are created on the server host
(``shipyard token create``) or by a signed-in user (``POST /api/v1/tokens``), stored as hashes.
"""

from __future__ import annotations

import os

import anyio.to_thread
from starlette.types import ASGIApp, Receive, Scope, Send

from shipyard.context import Context
from shipyard.domain.principals import LOCAL_PRINCIPAL, Principal
from shipyard.errors import AuthenticationError, InvalidInputError
from shipyard.security.audit import record_auth_failure
from shipyard.security.tokens import authenticate

ENV_AUTH = "SHIPYARD_AUTH"
LOCAL_ACTOR = "local"
PUBLIC_PATHS = frozenset({"/healthz"})
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def auth_enabled(auth: bool | None, env: dict[str, str] | None = None) -> bool:
    """``auth`` when given; otherwise ``SHIPYARD_AUTH`` (1/true/yes/on; unset means off)."""
    if auth is not None:
        return auth
    raw = (os.environ if env is None else env).get(ENV_AUTH, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise InvalidInputError(
        f"{ENV_AUTH}={raw!r} is not a switch: use 1 (auth on) or 0 (auth off)", field=ENV_AUTH
    )


class AuthMiddleware:
    """Resolve the caller for every HTTP request: ``request.state.principal`` (and ``.actor``)."""

    def __init__(self, app: ASGIApp, *, ctx: Context, enabled: bool) -> None:
        self.app = app
        self.ctx = ctx
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        principal = LOCAL_PRINCIPAL
        if self.enabled and scope["path"] not in PUBLIC_PATHS:
            # a database read (and at most a write a minute): keep it off the event loop
            principal = await anyio.to_thread.run_sync(self._authenticate, scope)
        state = scope.setdefault("state", {})
        state["principal"] = principal
        state["actor"] = principal.actor
        await self.app(scope, receive, send)

    def _authenticate(self, scope: Scope) -> Principal:
        try:
            return authenticate(self.ctx, secret=_bearer(scope))
        except AuthenticationError as exc:
            self._failed(exc, scope)
            raise

    def _failed(self, exc: AuthenticationError, scope: Scope) -> None:
        """Note a refused request in the audit log (rate-limited there)."""
        client = scope.get("client")
        host = f"{client[0]}" if client else None
        record_auth_failure(self.ctx, reason=exc.message, client=host)


def _bearer(scope: Scope) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == b"authorization":
            header: str = bytes(value).decode("latin-1")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise AuthenticationError(
                    "the Authorization header must be 'Bearer <token>'", field="authorization"
                )
            return token.strip()
    return None
