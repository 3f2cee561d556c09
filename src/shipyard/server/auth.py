"""Who is calling: bearer-token authentication for every route but ``/healthz``.

When auth is on, a request without a valid ``Authorization: Bearer <token>`` gets a 401 JSON error
before any route (or body read) runs; a valid token's actor name (``token:NAME``) is put on the
request and flows into the service context, so audit events name who did what. When auth is off
every caller is ``local``, which is only safe on a loopback address (``serve`` refuses otherwise).
There is no default token or password: tokens are created on the server host
(``security.tokens.create_token``) and stored only as hashes.
"""

from __future__ import annotations

import os

import anyio.to_thread
from starlette.types import ASGIApp, Receive, Scope, Send

from shipyard.context import Context
from shipyard.errors import AuthenticationError, InvalidInputError
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
    """Resolve the caller for every HTTP request and store it as ``request.state.actor``."""

    def __init__(self, app: ASGIApp, *, ctx: Context, enabled: bool) -> None:
        self.app = app
        self.ctx = ctx
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        actor = LOCAL_ACTOR
        if self.enabled and scope["path"] not in PUBLIC_PATHS:
            secret = _bearer(scope)
            # a database read: keep it off the event loop
            actor = await anyio.to_thread.run_sync(self._authenticate, secret)
        scope.setdefault("state", {})["actor"] = actor
        await self.app(scope, receive, send)

    def _authenticate(self, secret: str | None) -> str:
        return authenticate(self.ctx, secret=secret)


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
