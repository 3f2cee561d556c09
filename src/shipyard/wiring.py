"""The one place URLs become backends: scheme -> "module:attr" tables, imported lazily.

- ``EXECUTORS``: where admitted jobs run. ``local`` (this machine's supervisors) or
  ``ray://HOST:PORT`` (an existing Ray cluster; the ``shipyard[ray]`` extra). ``open_executor``
  builds one per URL and settings per process; the admission pipeline, the nodes service and
  ``shipyard server --executor`` go through it, nothing else names a concrete executor.
- ``DATABASES``: the metadata store's URL scheme -> the SQLAlchemy driver ``store.engine`` uses.
- ``BLOBS``: the blob store's URL scheme -> its class (``blobs.store.open_blobs`` asks here); a
  scheme not listed goes to fsspec through the ``*`` entry.

Only ``shipyard.settings`` and ``shipyard.errors`` are imported at module level, so every layer
may consult these tables; a backend's module is imported the first time its URL is opened.
"""

from __future__ import annotations

import importlib
import threading
from typing import TYPE_CHECKING, Any

from shipyard.errors import InvalidInputError
from shipyard.settings import Settings

if TYPE_CHECKING:
    from shipyard.compute.executors.base import Executor

EXECUTORS: dict[str, str] = {
    "local": "shipyard.compute.executors.local:LocalExecutor",
    "ray": "shipyard.compute.executors.ray:RayExecutor",
}
# scheme -> SQLAlchemy driver name
DATABASES: dict[str, str] = {
    "sqlite": "sqlite",
    "postgresql": "postgresql+psycopg",
}
BLOBS: dict[str, str] = {
    "file": "shipyard.blobs.store:BlobStore",
    "*": "shipyard.blobs.store:BlobStore",  # any other fsspec URL (s3://, gs://, memory://...)
}
# the pip extra a backend needs, for the error when its package is missing
EXTRAS: dict[str, str] = {"ray": "ray", "postgresql": "postgres", "s3": "s3"}

_executors: dict[tuple[str, str], Executor] = {}
_lock = threading.Lock()


def executor_scheme(url: str) -> str:
    """``local`` -> "local", ``ray://head:10001`` -> "ray"; InvalidInputError when unknown."""
    text = (url or "").strip()
    scheme = text.split("://", 1)[0].lower() if "://" in text else text.lower()
    if scheme not in EXECUTORS:
        raise InvalidInputError(
            f"executor {url!r} is not known: use one of "
            + ", ".join("local" if s == "local" else f"{s}://HOST:PORT" for s in EXECUTORS),
            field="executor",
        )
    return scheme


def open_executor(url: str, settings: Settings | None = None) -> Executor:
    """The executor for ``url`` (one instance per URL and settings in this process)."""
    settings = settings if settings is not None else Settings.from_env()
    scheme = executor_scheme(url)
    key = (url, repr(settings))
    with _lock:
        found = _executors.get(key)
        if found is None:
            cls = load(EXECUTORS[scheme], scheme=scheme, field="executor")
            found = cls(url, settings)
            _executors[key] = found
        return found


def close_executors() -> None:
    """Close every executor this process opened (a server's shutdown; tests)."""
    with _lock:
        opened = list(_executors.values())
        _executors.clear()
    for executor in opened:
        executor.close()


def database_driver(backend: str) -> str | None:
    """The SQLAlchemy driver for a database URL's backend name, None when not supported."""
    return DATABASES.get(backend)


def blob_backend(url: str) -> Any:
    """The blob store class for ``url``'s scheme."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else "file"
    target = BLOBS.get(scheme, BLOBS["*"])
    return load(target, scheme=scheme, field="blobs")


def load(target: str, *, scheme: str, field: str) -> Any:
    """Import ``module:attr``; a missing package is an InvalidInputError naming the extra."""
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = EXTRAS.get(scheme)
        how = f"pip install 'shipyard[{extra}]'" if extra else f"install {exc.name or module_name}"
        raise InvalidInputError(
            f"the {scheme} {field} backend needs a package that is not installed ({exc}): {how}",
            field=field,
        ) from None
    return getattr(module, attr)


__all__ = [
    "BLOBS",
    "DATABASES",
    "EXECUTORS",
    "close_executors",
    "database_driver",
    "executor_scheme",
    "open_executor",
]
