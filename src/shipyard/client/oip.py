"""The SDK's side of inference and of waiting for a deployment: one OIP v2 call, and a poll
until a deployment has settled. Shared by the embedded and the HTTP backends."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx

from shipyard.domain.models import Deployment
from shipyard.errors import BackendError, InvalidInputError, ShipyardError, error_from_dict

POLL_S = 0.1
REQUEST_ID = "X-Request-Id"
VERSION_HEADER = "X-Shipyard-Model-Version"


def oip_call(
    url: str,
    name: str,
    request: dict[str, Any],
    request_id: str | None = None,
    *,
    client: httpx.Client | None = None,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """POST one OIP v2 inference request to ``url``; the response body, with the request id
    and (through a gateway) the version that served it added under ``shipyard``.

    A 4xx answer is InvalidInputError (the replica's message quoted), anything else that is not
    a 200 is BackendError.
    """
    headers = {REQUEST_ID: request_id or uuid.uuid4().hex}
    try:
        if client is None:
            response = httpx.post(
                url, json=request, headers=headers, timeout=timeout, trust_env=False
            )
        else:
            response = client.post(url, json=request, headers=headers, timeout=timeout)
    except httpx.TransportError as exc:
        raise BackendError(f"deployment {name!r} could not be reached at {url}: {exc}") from None
    if response.status_code >= 400:
        shipyard_error = _shipyard_error(response)
        if shipyard_error is not None:  # the gateway's own (unknown deployment, no replica)
            raise shipyard_error
        text = _message(response)
        error = InvalidInputError if response.status_code < 500 else BackendError
        raise error(f"deployment {name!r} answered {response.status_code}: {text}")
    body: dict[str, Any] = response.json()
    served = response.headers.get(VERSION_HEADER) or str(body.get("model_version", ""))
    body.setdefault("id", response.headers.get(REQUEST_ID, headers[REQUEST_ID]))
    body["shipyard"] = {
        "request_id": response.headers.get(REQUEST_ID, headers[REQUEST_ID]),
        "model_version": served,
    }
    return body


def poll_settled(get: Callable[[], Deployment], timeout: float) -> Deployment:
    """Call ``get`` until the deployment it returns has settled, or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        current = get()
        if current.settled() or time.monotonic() >= deadline:
            return current
        time.sleep(POLL_S)


def _shipyard_error(response: httpx.Response) -> ShipyardError | None:
    try:
        body = response.json()
    except ValueError:
        return None
    if isinstance(body, dict) and isinstance(body.get("code"), str) and "message" in body:
        return error_from_dict(body, status=response.status_code)
    return None


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        error = body.get("error") or body.get("message") or body
        if isinstance(error, dict):
            return str(error.get("message", error))
        return str(error)
    return str(body)[:500]
