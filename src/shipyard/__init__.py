"""shipyard: data, training jobs, tracking, registry, serving and monitoring on your own hardware.

The public SDK. Names resolve lazily (PEP 562) so that ``python -m shipyard.<module>`` processes
- job supervisors, replicas - do not pay for importing the whole SDK.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "init": "shipyard.client.tracking",
    "ActiveRun": "shipyard.client.tracking",
    "Client": "shipyard.client.client",
    "ShipyardError": "shipyard.errors",
    "InvalidInputError": "shipyard.errors",
    "NotFoundError": "shipyard.errors",
    "ConflictError": "shipyard.errors",
    "InvalidStateError": "shipyard.errors",
    "AuthenticationError": "shipyard.errors",
    "UnsafePathError": "shipyard.errors",
}

__all__ = [
    "ActiveRun",
    "AuthenticationError",
    "Client",
    "ConflictError",
    "InvalidInputError",
    "InvalidStateError",
    "NotFoundError",
    "ShipyardError",
    "UnsafePathError",
    "__version__",
    "init",
]

if TYPE_CHECKING:
    from shipyard.client.client import Client
    from shipyard.client.tracking import ActiveRun, init
    from shipyard.errors import (
        AuthenticationError,
        ConflictError,
        InvalidInputError,
        InvalidStateError,
        NotFoundError,
        ShipyardError,
        UnsafePathError,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'shipyard' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
