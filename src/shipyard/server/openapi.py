"""The OpenAPI document, with integer bounds as exact integers.

FastAPI's OpenAPI models hold ``minimum``/``maximum`` as floats, so ``le=2**63 - 1`` would be
published as ``9.223372036854776e+18`` - which is 2^63, one past what the server accepts - and
every small bound as ``0.0``. This puts integer schemas' bounds back as integers, the 64-bit
ones clamped to the signed 64-bit range (the only bounds this API has near 2^63 are 2^63 - 1 and
-2^63, and no float between them and the range's ends is a bound here).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from shipyard.schemas import ErrorBody

# The errors any route may answer, all as ``ErrorBody`` (``server/errors.py`` makes every error
# that shape, including FastAPI's own validation errors, which it would document otherwise as
# ``{"detail": [...]}``).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in (
        (400, "Bad request (e.g. an unsafe path, malformed JSON)"),
        (401, "No valid API token"),
        (403, "The caller's role does not allow it"),
        (404, "No such resource (in this project)"),
        (422, "Invalid input; `field` names it"),
    )
}

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def install_exact_openapi(app: FastAPI) -> None:
    """Make ``app.openapi()`` (and ``/openapi.json``) publish integer bounds exactly."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = exact_integer_bounds(build())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def exact_integer_bounds(node: Any) -> Any:
    """``node`` with every integer schema's float bounds made integers (in place; returned)."""
    if isinstance(node, list):
        for item in node:
            exact_integer_bounds(item)
    elif isinstance(node, dict):
        if node.get("type") == "integer":
            for key in _BOUNDS:
                value = node.get(key)
                if isinstance(value, float) and value.is_integer():
                    node[key] = max(INT64_MIN, min(INT64_MAX, int(value)))
        for value in node.values():
            exact_integer_bounds(value)
    return node
