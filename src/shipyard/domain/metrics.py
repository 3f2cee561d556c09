"""What a metric point may hold: the rules the tracking service and the SDK both apply.

A value is a real number, NaN and the infinities included (a diverging loss is an everyday
value). Booleans, strings, ``None`` and anything ``float()`` refuses are not. On the wire, where
JSON has no NaN, the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` stand for them.
A point that breaks a rule is rejected on its own, named by its key and step; it never sinks the
rest of its batch.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Protocol

MAX_KEY_LEN = 250
MAX_STEP = 2**63 - 1  # a BIGINT column

WIRE_SPECIALS: dict[str, float] = {
    "nan": math.nan,
    "inf": math.inf,
    "+inf": math.inf,
    "infinity": math.inf,
    "+infinity": math.inf,
    "-inf": -math.inf,
    "-infinity": -math.inf,
}


class PointLike(Protocol):
    """A metric point as it arrives: a ``MetricPoint``, a :class:`Point`, or a REST body's point
    whose value may be anything JSON holds (the service checks it)."""

    @property
    def key(self) -> Any: ...
    @property
    def value(self) -> Any: ...
    @property
    def step(self) -> Any: ...
    @property
    def timestamp(self) -> Any: ...


class Point(NamedTuple):
    """A light metric point: what the SDK buffers and sends (a pydantic model per point would
    cost more than storing it)."""

    key: str
    value: float
    step: int
    timestamp: float


class BadMetric(ValueError):
    """Why one metric point cannot be stored."""


def metric_value(value: object, *, wire: bool = False) -> float:
    """``value`` as a float, or :class:`BadMetric` saying why it is not a metric value.

    ``wire=True`` also reads the JSON stand-ins ``"NaN"``, ``"Infinity"``, ``"-Infinity"``.
    """
    kind = type(value)
    if kind is float:
        return value  # type: ignore[return-value]
    if kind is int:
        return _from_int(value)  # type: ignore[arg-type]
    if value is None:
        raise BadMetric("the value is missing (null); log NaN for a value that is not a number")
    if isinstance(value, bool) or kind.__name__ in ("bool_", "bool"):
        raise BadMetric(f"{value!r} is a boolean, not a number; log 0 or 1")
    if isinstance(value, str | bytes):
        if wire and isinstance(value, str) and value.strip().lower() in WIRE_SPECIALS:
            return WIRE_SPECIALS[value.strip().lower()]
        raise BadMetric(f"{_short(value)} is a string, not a number")
    if isinstance(value, int):
        return _from_int(value)
    try:
        return float(value)  # type: ignore[arg-type]  # numpy scalars, 0-d tensors, Decimal
    except (TypeError, ValueError, OverflowError):
        raise BadMetric(f"{_short(value)} is not a number") from None


def key_problem(key: object) -> str | None:
    """Why ``key`` cannot name a metric, or None."""
    if not isinstance(key, str) or not key:
        return "the key must be a non-empty string"
    if len(key) > MAX_KEY_LEN:
        return f"the key is longer than {MAX_KEY_LEN} characters"
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        return "the key holds a control character"
    return None


def step_problem(step: object) -> str | None:
    """Why ``step`` cannot be a metric step, or None."""
    if isinstance(step, bool) or not isinstance(step, int):
        return f"the step {_short(step)} is not an integer"
    if step < 0:
        return f"the step {step} is negative"
    if step > MAX_STEP:
        return f"the step {step} is larger than {MAX_STEP}"
    return None


def timestamp_problem(timestamp: object) -> str | None:
    if isinstance(timestamp, bool) or not isinstance(timestamp, int | float):
        return "the timestamp is not a number"
    if not math.isfinite(timestamp):
        return "the timestamp is not finite"
    return None


def _from_int(value: int) -> float:
    try:
        return float(value)
    except OverflowError:
        raise BadMetric(f"the integer {_short(value)} is too large for a float") from None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
