"""What a transform's worker process runs: import the user's function, call it on one batch or
one file. Kept apart from :mod:`shipyard.data.transform` so that a spawned worker imports only the
standard library, pyarrow and ``shipyard.errors`` -- not the metadata store, the blob store and
the quality checks (seconds per worker on a small machine)."""

from __future__ import annotations

import importlib
import io
import os
import shutil
import sys
import tempfile
import traceback
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from shipyard.errors import InvalidInputError


class WorkerError(Exception):
    """A failure of the user's function: ``(summary, traceback)``, plain strings that pickle."""


def init_worker(search_path: list[str]) -> None:
    for folder in reversed(search_path):
        if folder not in sys.path:
            sys.path.insert(0, folder)


_loaded: dict[str, Callable[..., Any]] = {}


def _function(fn: str) -> Callable[..., Any]:
    if fn not in _loaded:
        _loaded[fn] = import_object(fn, ())
    return _loaded[fn]


# Set in a Ray task's environment to the digest of the code it was sent (see call_with_code).
CODE_ENV = "SHIPYARD_TRANSFORM_CODE"


def call_with_code(
    digest: str | None, code: bytes | None, call: Callable[..., Any], *args: Any
) -> Any:
    """A Ray task: ``call(*args)`` (``call_batch`` or ``call_file``) after unpacking ``code`` (a
    zip of the function's package or module, named by ``digest``) onto ``sys.path``, once per
    process. ``code`` is a top-level argument so that Ray resolves its object reference."""
    if digest is not None and code is not None:
        init_worker([str(_unpacked(digest, code))])
    return call(*args)


def _unpacked(digest: str, data: bytes) -> Path:
    """The folder ``data`` is unpacked in, by its digest (written once; a temporary sibling
    renamed into place, so a worker never sees half of it)."""
    dest = Path(tempfile.gettempdir()) / f"shipyard-transform-{digest[:24]}"
    if not dest.is_dir():
        partial = Path(tempfile.mkdtemp(prefix=f"{dest.name}-", dir=dest.parent))
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            archive.extractall(partial)
        try:
            os.rename(partial, dest)
        except OSError:  # another worker's is there first
            shutil.rmtree(partial, ignore_errors=True)
            if not dest.is_dir():
                raise
    return dest


def call_batch(fn: str, batch: pa.RecordBatch, params: dict[str, Any]) -> pa.Table | None:
    try:
        result = _function(fn)(batch, **params)
    except Exception as exc:
        raise WorkerError(f"{type(exc).__name__}: {exc}", traceback.format_exc()) from None
    if result is None:
        return None
    if isinstance(result, pa.RecordBatch):
        return pa.Table.from_batches([result])
    if isinstance(result, pa.Table):
        return result
    raise WorkerError(
        f"it returned {type(result).__name__}; return a pyarrow RecordBatch, Table or None", ""
    )


def call_file(fn: str, path: str, data: bytes, params: dict[str, Any]) -> bytes | None:
    try:
        result = _function(fn)(path, data, **params)
    except Exception as exc:
        raise WorkerError(f"{type(exc).__name__}: {exc}", traceback.format_exc()) from None
    if result is None or isinstance(result, bytes):
        return result
    raise WorkerError(f"it returned {type(result).__name__}; return bytes or None", "")


def import_object(fn: str, search_path: Sequence[str]) -> Any:
    """The object ``pkg.module:attr.attr`` names, importing the module."""
    module_name, _, qualname = fn.partition(":")
    added = [p for p in search_path if p not in sys.path]
    sys.path[:0] = added
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise InvalidInputError(
            f"--fn {fn!r}: module {module_name!r} cannot be imported ({type(exc).__name__}: "
            f"{exc}); install it, or run from the folder that holds it",
            field="fn",
        ) from None
    finally:
        for p in added:
            sys.path.remove(p)
    target: Any = module
    for part in qualname.split("."):
        if not hasattr(target, part):
            raise InvalidInputError(
                f"--fn {fn!r}: module {module_name!r} has no {qualname!r}", field="fn"
            )
        target = getattr(target, part)
    return target
