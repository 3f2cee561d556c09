"""``shipyard.init()`` and the active run: logging that never blocks the training loop.

``run.log()`` appends to an in-memory buffer and returns; a background thread sends the buffer as
one batch every ``flush_interval`` seconds, or at once when ``max_buffer`` points are waiting, so
a loop logging thousands of points costs one round-trip (one transaction) per batch. A failed
send is re-raised on the next call to ``log``/``flush``/``finish`` rather than swallowed.

Inside a job, ``SHIPYARD_RUN_ID`` names the run the scheduler created, and ``init()`` attaches to
it; elsewhere it creates a new run. A run that is still open when the process exits is flushed and
finished (failed if the process is dying of an exception).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any

from shipyard.client.client import Client
from shipyard.domain.models import Artifact, DatasetVersion, MetricPoint, ModelVersion, RunStatus
from shipyard.errors import InvalidInputError, InvalidStateError
from shipyard.settings import ENV_RUN_ID


class ActiveRun:
    """A run being logged to. Use as a context manager, or call :meth:`finish`."""

    def __init__(
        self,
        client: Client,
        run_id: str,
        *,
        project: str,
        name: str,
        flush_interval: float = 1.0,
        max_buffer: int = 5000,
    ) -> None:
        self.client = client
        self.id = run_id
        self.project = project
        self.name = name
        self._backend = client.backend
        self._flush_interval = flush_interval
        self._max_buffer = max_buffer
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._buffer: list[MetricPoint] = []
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._step = 0
        self._error: BaseException | None = None
        self._finished = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"shipyard-run-{run_id}", daemon=True
        )
        self._thread.start()
        _open_runs.add(self)

    # --- logging -------------------------------------------------------------------------------

    def log(self, metrics: dict[str, float], *, step: int | None = None) -> None:
        """Buffer metric values; ``step`` defaults to a counter that advances on every call."""
        self._raise_pending()
        self._check_open()
        now = time.time()
        with self._lock:
            if step is None:
                step = self._step
                self._step += 1
            else:
                self._step = max(self._step, step + 1)
            for key, value in metrics.items():
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    raise InvalidInputError(
                        f"metric {key!r} is not a number: {value!r}", field="metrics"
                    ) from None
                self._buffer.append(MetricPoint(key=key, value=number, step=step, timestamp=now))
            full = len(self._buffer) >= self._max_buffer
        if full:
            self._wake.set()

    def log_params(self, params: dict[str, Any]) -> None:
        self._check_open()
        with self._lock:
            self._params.update({k: _text(v) for k, v in params.items()})
        self.flush()  # params are few and matter for reproducibility: send now

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._check_open()
        with self._lock:
            self._tags.update({k: _text(v) for k, v in tags.items()})

    def log_artifact(self, local_path: str | Path, *, name: str | None = None) -> Artifact:
        local = Path(local_path)
        if not local.is_file():
            raise InvalidInputError(f"{local} is not a file", field="local_path")
        return self._backend.log_artifact(self.id, path=name or local.name, local_file=local)

    def log_model(
        self,
        local_path: str | Path,
        *,
        name: str,
        artifact_path: str = "model.onnx",
        register: bool = True,
        description: str = "",
    ) -> ModelVersion | None:
        """Store an ONNX file as an artifact and (by default) register it as a model version."""
        self.flush()  # the version records the run's latest metrics
        self.log_artifact(local_path, name=artifact_path)
        if not register:
            return None
        return self._backend.register_model_version(
            project=self.project,
            model=name,
            run_id=self.id,
            artifact_path=artifact_path,
            description=description,
        )

    def use_dataset(self, name: str, version: int | str | None = None) -> DatasetVersion:
        """Resolve a dataset version and record it as this run's input (lineage)."""
        dv = self._backend.get_dataset_version(project=self.project, name=name, version=version)
        self._backend.add_run_input(self.id, project=self.project, dataset=name, version=dv.version)
        return dv

    # --- lifecycle -----------------------------------------------------------------------------

    def flush(self) -> None:
        """Send everything buffered now; raises the error of a failed background send."""
        self._send()
        self._raise_pending()

    def finish(self, status: RunStatus | str = RunStatus.FINISHED) -> None:
        if self._finished:
            return
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        self._send()
        self._finished = True
        _open_runs.discard(self)
        self._raise_pending()
        self._backend.finish_run(self.id, status=RunStatus(status))

    def __enter__(self) -> ActiveRun:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is KeyboardInterrupt:
            self.finish(RunStatus.KILLED)
        else:
            self.finish(RunStatus.FAILED if exc_type else RunStatus.FINISHED)

    # --- internals -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._flush_interval)
            self._wake.clear()
            self._send()

    def _send(self) -> None:
        with self._send_lock:
            with self._lock:
                points, self._buffer = self._buffer, []
                params, self._params = self._params, {}
                tags, self._tags = self._tags, {}
            if not (points or params or tags):
                return
            try:
                self._backend.log_batch(self.id, metrics=points, params=params, tags=tags)
            except BaseException as exc:  # surfaced on the caller's next call
                self._error = exc

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _check_open(self) -> None:
        if self._finished:
            raise InvalidStateError(f"run {self.id} is finished; start a new one with init()")


_open_runs: weakref.WeakSet[ActiveRun] = weakref.WeakSet()


def init(
    *,
    project: str | None = None,
    name: str | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
    client: Client | None = None,
    flush_interval: float = 1.0,
) -> ActiveRun:
    """Start (or, inside a job, attach to) a run and return it."""
    client = client or Client()
    attach_to = os.environ.get(ENV_RUN_ID)
    if attach_to:
        run = client.backend.get_run(attach_to)
    else:
        run = client.backend.create_run(
            project=project or client.project,
            name=name,
            tags={k: _text(v) for k, v in (tags or {}).items()},
        )
    active = ActiveRun(
        client, run.id, project=run.project, name=run.name, flush_interval=flush_interval
    )
    if attach_to and tags:
        active.set_tags(tags)
    if params:
        active.log_params(params)
    return active


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


@atexit.register
def _finish_open_runs() -> None:
    dying = sys.exc_info()[0] is not None or getattr(sys, "last_value", None) is not None
    for run in list(_open_runs):
        try:
            run.finish(RunStatus.FAILED if dying else RunStatus.FINISHED)
        except Exception as exc:  # at exit there is no caller left to raise to
            print(f"shipyard: could not finish run {run.id}: {exc}", file=sys.stderr)
