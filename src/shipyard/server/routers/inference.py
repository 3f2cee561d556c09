"""Inference (``/v2/models/{deployment}/...``): the gateway's OIP routes, thin over
``shipyard.serving.gateway``.

The server's root is the default project's OIP base URL and ``/projects/{project}`` any
project's, so an OIP client (tritonclient, KServe's) pointed at either works unchanged.

Two ways in, one gateway. :class:`InferenceFastPath`, which the app (``app.ShipyardApp``) puts
in front of its whole stack, answers these routes itself when the guards would let the request
through unchanged and the caller is known without the database: auth off (on a loopback
address), or a bearer token that ``authenticate`` accepted seconds ago
(``tokens.verified_principal``). That skips FastAPI's and the guards' layers, the auth thread
hop, routing, dependencies and response classes - most of a request's cost when the replica
answers in a fraction of a millisecond. What it answers is still counted in the metrics under
its route template and has unexpected errors answered as the usual 500. Everything else - no
token, a bad or unknown one, one not seen for a few seconds, an unusual path, a body declared
over the limit, another method - goes the long way, to the FastAPI routes below, which
authenticate (and so remember the token), check the body size and call the same
``Gateway.forward``. The routes stay declared either way, so the OpenAPI document lists them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from shipyard.context import Context
from shipyard.domain.names import NAME_RE
from shipyard.domain.principals import LOCAL_PRINCIPAL, Principal
from shipyard.errors import PayloadTooLargeError, ShipyardError
from shipyard.monitoring.metrics import MetricsMiddleware, ServerMetrics
from shipyard.security.tokens import verified_principal
from shipyard.server.deps import Ctx, ProjectPath, name_path
from shipyard.server.errors import InternalErrorMiddleware, error_response
from shipyard.server.guards import MiB
from shipyard.serving.gateway import Gateway
from shipyard.settings import DEFAULT_PROJECT

router = APIRouter(tags=["inference"])

_TARGET = "shipyard.inference"  # scope key: what the fast path matched

DeploymentName = Annotated[str, name_path("The deployment (a name).")]
Version = Annotated[str, name_path("A model version the deployment serves.")]


@router.post("/v2/models/{name}/infer", response_class=Response)
async def infer(name: DeploymentName, request: Request, ctx: Ctx) -> Response:
    return await _forward(request, ctx, DEFAULT_PROJECT, name, f"/v2/models/{name}/infer")


@router.post("/projects/{project}/v2/models/{name}/infer", response_class=Response)
async def infer_in_project(
    project: ProjectPath, name: DeploymentName, request: Request, ctx: Ctx
) -> Response:
    return await _forward(request, ctx, project, name, f"/v2/models/{name}/infer")


@router.get("/v2/models/{name}", response_class=Response)
async def model_metadata(name: DeploymentName, request: Request, ctx: Ctx) -> Response:
    return await _forward(request, ctx, DEFAULT_PROJECT, name, f"/v2/models/{name}", "GET")


@router.get("/projects/{project}/v2/models/{name}", response_class=Response)
async def model_metadata_in_project(
    project: ProjectPath, name: DeploymentName, request: Request, ctx: Ctx
) -> Response:
    return await _forward(request, ctx, project, name, f"/v2/models/{name}", "GET")


@router.get("/v2/models/{name}/ready", response_class=Response)
async def model_ready(name: DeploymentName, request: Request, ctx: Ctx) -> Response:
    return await _forward(request, ctx, DEFAULT_PROJECT, name, f"/v2/models/{name}/ready", "GET")


@router.get("/projects/{project}/v2/models/{name}/ready", response_class=Response)
async def model_ready_in_project(
    project: ProjectPath, name: DeploymentName, request: Request, ctx: Ctx
) -> Response:
    return await _forward(request, ctx, project, name, f"/v2/models/{name}/ready", "GET")


class InferenceFastPath:
    """Answer the OIP routes above without FastAPI when the caller is already known.

    It sits in front of the whole app (``app``: everything it does not answer goes there, and
    through every guard) and answers a request only when the guards would let it through
    unchanged: a plain path (no percent-encoding; project and deployment are names), a
    loopback address when auth is off (``local_refused``: the loopback guard's rule), a caller
    known without the database (auth off, or a token verified seconds ago), and a declared body
    within ``max_body_bytes`` (a chunked one is cut off with a 413 once it passes the bound).
    What it answers is counted in ``metrics`` under the route's template and has unexpected
    errors turned into the usual 500, as the app's own middlewares do.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        ctx: Context,
        gateway: Gateway,
        metrics: ServerMetrics,
        auth: bool,
        max_body_bytes: int,
        local_refused: Callable[[str], bool],
    ) -> None:
        self.app = app
        self.ctx = ctx
        self.gateway = gateway
        self.auth = auth
        self.max_body_bytes = max_body_bytes
        self.local_refused = local_refused
        self._routes = {
            (method, route.path): route
            for route in router.routes
            if isinstance(route, APIRoute)
            for method in route.methods or ()
        }
        self._contexts: dict[int, tuple[Principal, Context]] = {}
        self._guarded = MetricsMiddleware(InternalErrorMiddleware(self._answer), metrics=metrics)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self._accept(scope):
            await self._guarded(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _accept(self, scope: Scope) -> bool:
        """Whether to answer here; if so, the request's route, caller and target go in scope."""
        matched = _match(scope)
        if matched is None:
            return False
        if not self.auth:
            server = scope.get("server")
            if server and self.local_refused(str(server[0])):
                return False  # the loopback guard answers
            principal = LOCAL_PRINCIPAL
        else:
            secret = _bearer(scope)
            known = None if secret is None else verified_principal(self.ctx, secret=secret)
            if known is None:
                return False  # the auth middleware checks the token in the store
            principal = known
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            return False  # the body guard answers (and closes)
        state = scope.setdefault("state", {})
        state["principal"] = principal
        state["actor"] = principal.actor
        scope["route"] = self._routes[(matched[0], matched[1])]  # the metrics' route label
        scope[_TARGET] = matched
        return True

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, _template, project, name, path = scope[_TARGET]
        try:
            body = await self._body(receive) if method == "POST" else b""
            answer = await self.gateway.forward(
                self._context(scope["state"]["principal"]),
                project=project,
                name=name,
                path=path,
                body=body,
                headers=scope["headers"],
                method=method,
            )
        except ShipyardError as exc:
            await error_response(exc)(scope, receive, send)
            return
        except _ClientGone:
            return
        headers = answer.raw_headers
        headers.append((b"content-length", b"%d" % len(answer.content)))
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": answer.content})

    def _context(self, principal: Principal) -> Context:
        known = self._contexts.get(id(principal))
        if known is not None and known[0] is principal:
            return known[1]
        if len(self._contexts) > 1024:
            self._contexts.clear()
        ctx = self.ctx.as_principal(principal)
        self._contexts[id(principal)] = (principal, ctx)
        return ctx

    async def _body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: nothing to answer
                raise _ClientGone()
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise PayloadTooLargeError(
                        f"the request body is larger than {_size(self.max_body_bytes)}, the "
                        "server's limit for an API request body (upload files as blobs)",
                        field="body",
                        limit=self.max_body_bytes,
                    )
                chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class _ClientGone(Exception):
    """The client disconnected before its request body was read: there is no one to answer."""


# --- helpers ------------------------------------------------------------------------------------


async def _forward(
    request: Request, ctx: Ctx, project: str, name: str, path: str, method: str = "POST"
) -> Response:
    gateway: Gateway = request.app.state.gateway
    body = await request.body() if method == "POST" else b""
    answer = await gateway.forward(
        ctx,
        project=project,
        name=name,
        path=path,
        body=body,
        headers=request.headers.raw,
        method=method,
    )
    return Response(content=answer.content, status_code=answer.status, headers=answer.headers)


def _match(scope: Scope) -> tuple[str, str, str, str, str] | None:
    """``(method, route template, project, name, replica path)`` of an OIP route, else None."""
    method: str = scope["method"]
    if method not in ("POST", "GET"):
        return None
    parts: list[Any] = scope["path"].split("/")
    if len(parts) >= 4 and parts[1] == "projects":
        project, rest, prefix = parts[2], parts[3:], "/projects/{project}"
    else:
        project, rest, prefix = DEFAULT_PROJECT, parts[1:], ""
    if len(rest) < 3 or rest[0] != "v2" or rest[1] != "models" or not rest[2] or not project:
        return None
    name = rest[2]
    raw = scope.get("raw_path")
    if (raw is not None and b"%" in raw) or not (_plain(name) and _plain(project)):
        return None  # the path guard and the services judge anything unusual
    if len(rest) == 4 and rest[3] == "infer" and method == "POST":
        tail = "/infer"
    elif len(rest) == 4 and rest[3] == "ready" and method == "GET":
        tail = "/ready"
    elif len(rest) == 3 and method == "GET":
        tail = ""
    else:
        return None
    template = f"{prefix}/v2/models/{{name}}{tail}"
    return method, template, project, name, f"/v2/models/{name}{tail}"


def _plain(segment: str) -> bool:
    return NAME_RE.match(segment) is not None


def _bearer(scope: Scope) -> str | None:
    """The bearer token, or None when there is none or the header is not ``Bearer <token>``
    (the auth middleware says what is wrong then)."""
    for key, value in scope["headers"]:
        if key == b"authorization":
            scheme, _, token = bytes(value).decode("latin-1").partition(" ")
            token = token.strip()
            return token if scheme.lower() == "bearer" and token else None
    return None


def _size(n: int) -> str:
    return f"{n / MiB:g} MiB" if n >= MiB else f"{n} bytes"


def _content_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
