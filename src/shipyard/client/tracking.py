"""``shipyard.init()`` and the active run: logging that never slows the loop down, or loses a point.

``run.log()`` checks its values and appends them to an in-memory buffer; a background sender
thread sends what is buffered every ``flush_interval`` seconds, or at once when ``max_buffer``
points are waiting, in batches of at most what the service accepts (``MAX_BATCH``), so a loop
logging thousands of points costs one round-trip (one transaction) per batch.

Nothing is dropped on the way:

- A batch that fails for a reason that may pass (the server is down or restarting, the database
  is busy) goes back to the front of the buffer and is retried with exponential backoff.
- Memory is bounded: when ``max_pending`` points are waiting (the server is slow or away),
  ``log()`` **blocks** until the sender has made room. It never spills to disk and never drops.
- ``finish()`` sends everything, retrying for up to ``finish_timeout`` seconds; if points are
  still unsent (or the service refused some for good, e.g. the run was killed meanwhile) it raises,
  naming how many, and does **not** mark the run finished. The unsent points stay buffered:
  calling ``finish()`` again retries them.
- A value that is not a number (a string, a boolean, None) is rejected by ``log()`` itself: the
  call's other values are kept, and ``log()`` raises :class:`InvalidInputError` naming each
  rejected key and the step. NaN and +-Infinity are ordinary values and are stored.

The sender also beats: a heartbeat every ``heartbeat_interval`` seconds without a batch, so a
process that dies without ``finish()`` (kill -9, a kernel restart) has its run marked ``crashed``
once the grace period (``SHIPYARD_RUN_GRACE_S``, default 60 s) has passed.

Inside a job, ``SHIPYARD_RUN_ID`` names the run the scheduler created, and ``init()`` attaches to
it; elsewhere it creates a new run. A run that is still open when the process exits is flushed and
finished (failed if the process is dying of an exception).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import os
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlalchemy.exc import OperationalError

from shipyard.client.client import Client
from shipyard.domain.metrics import BadMetric, Point, key_problem, metric_value, step_problem
from shipyard.domain.models import (
    Artifact,
    DatasetVersion,
    LogBatchResult,
    ModelVersion,
    RunStatus,
)
from shipyard.domain.names import validate_name, validate_relative_path
from shipyard.errors import (
    BackendError,
    IntegrityError,
    InvalidInputError,
    InvalidStateError,
    PayloadTooLargeError,
    ShipyardError,
    StorageFullError,
    StorageUnavailableError,
)
from shipyard.settings import ENV_RUN_ID
from shipyard.tracking.formats import bundle_onnx_file
from shipyard.tracking.runs import ENV_RUN_GRACE, MAX_BATCH, parse_grace

DEFAULT_MAX_PENDING = 200_000
DEFAULT_FINISH_TIMEOUT_S = 60.0
MAX_BACKOFF_S = 5.0
FIRST_BACKOFF_S = 0.05


class ActiveRun:
    """A run being logged to. Use as a context manager, or call :meth:`finish`.

    ``max_buffer``: send at once when this many points wait. ``max_pending``: the bound on
    buffered points; ``log()`` blocks while it is reached. ``finish_timeout``: how long
    ``finish()`` (and ``flush()``) keep retrying before they raise. ``heartbeat_interval``:
    seconds between heartbeats (default: a quarter of ``SHIPYARD_RUN_GRACE_S``, at most 10).
    """

    def __init__(
        self,
        client: Client,
        run_id: str,
        *,
        project: str,
        name: str,
        flush_interval: float = 1.0,
        max_buffer: int = 5000,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_batch: int = MAX_BATCH,
        finish_timeout: float = DEFAULT_FINISH_TIMEOUT_S,
        heartbeat_interval: float | None = None,
    ) -> None:
        if max_pending < 1 or max_batch < 1:
            raise InvalidInputError("max_pending and max_batch must be at least 1")
        self.client = client
        self.id = run_id
        self.project = project
        self.name = name
        self._backend = client.backend
        self._flush_interval = flush_interval
        self._max_buffer = max(1, min(max_buffer, max_pending))
        self._max_pending = max_pending
        self._batch = max(1, min(max_batch, MAX_BATCH))
        self._finish_timeout = finish_timeout
        self._heartbeat_interval = (
            heartbeat_interval
            if heartbeat_interval is not None
            else min(10.0, parse_grace(os.environ.get(ENV_RUN_GRACE)) / 4)
        )
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # log() waits here while the buffer is full
        self._send_lock = threading.Lock()
        self._buffer: collections.deque[Point] = collections.deque()
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._step = 0
        self._good_keys: set[str] = set()
        self._error: BaseException | None = None  # raised on the caller's next call
        self._last_failure: BaseException | None = None  # the last send that may pass
        self._refused = 0  # points the service refused for good
        self._failures = 0  # consecutive failed sends
        self._next_beat = 0.0
        self._closing = False
        self._finished = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"shipyard-run-{run_id}", daemon=True
        )
        self._thread.start()
        _open_runs.add(self)

    # --- logging -------------------------------------------------------------------------------

    def log(self, metrics: dict[str, Any], *, step: int | None = None) -> None:
        """Buffer metric values; ``step`` defaults to a counter that advances on every call.

        Values are numbers (NaN and +-Infinity included). A value that is not (a string, a
        boolean, None) or a bad key is rejected alone: the other values of the call are kept,
        then :class:`InvalidInputError` names each rejected key and the step.
        Blocks while ``max_pending`` points are waiting to be sent.
        """
        self._raise_pending()
        self._check_open()
        if step is not None and (problem := step_problem(step)) is not None:
            raise InvalidInputError(f"{problem}; nothing of this call was logged", field="step")
        now = time.time()
        bad: list[str] = []
        with self._room:
            while len(self._buffer) >= self._max_pending:
                if not self._thread.is_alive():
                    raise BackendError(f"the sender of run {self.id} has stopped")
                self._wake.set()
                self._room.wait(timeout=1.0)
            if step is None:
                step = self._step
                self._step += 1
            else:
                self._step = max(self._step, step + 1)
            for key, value in metrics.items():
                if key not in self._good_keys:
                    problem = key_problem(key)
                    if problem is not None:
                        bad.append(f"{key!r} ({problem})")
                        continue
                    self._good_keys.add(key)
                try:
                    number = metric_value(value)
                except BadMetric as exc:
                    bad.append(f"{key!r} ({exc})")
                    continue
                self._buffer.append(Point(key, number, step, now))
            full = len(self._buffer) >= self._max_buffer
        if full:
            self._wake.set()
        if bad:
            kept = len(metrics) - len(bad)
            raise InvalidInputError(
                f"metric {', '.join(bad)} at step {step} was not logged: a metric value must be "
                f"a number (NaN and infinities are fine); the other {kept} value(s) of this call "
                "were logged",
                field="metrics",
            )

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
        self._check_open()
        local = Path(local_path)
        if not local.is_file():
            raise InvalidInputError(f"{local} is not a file", field="local_path")
        return self._backend.log_artifact(
            self.id, path=name or local.name, local_file=local, project=self.project
        )

    def log_model(
        self,
        local_path: str | Path,
        *,
        name: str,
        artifact_path: str = "model.onnx",
        register: bool = True,
        description: str = "",
    ) -> ModelVersion | None:
        """Store an ONNX file as an artifact and (by default) register it as a model version.

        The file is checked before anything is stored, and nothing is stored when it is refused:
        it must be a servable ONNX model. Weights in an external data file next to it (torch's
        default ``model.onnx.data`` sidecar) are bundled in: the stored model is self-contained.
        """
        validate_name(name, field="name")
        validate_relative_path(artifact_path, field="artifact_path")
        content = bundle_onnx_file(local_path, field="local_path")  # raises before storing
        self.flush()  # the version records the run's latest metrics
        with tempfile.TemporaryDirectory(prefix="shipyard-model-") as tmp:
            checked = Path(tmp) / "model.onnx"
            checked.write_bytes(content)  # exactly the bytes that were checked are stored
            self.log_artifact(checked, name=artifact_path)
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

    @property
    def pending(self) -> int:
        """Points buffered and not yet stored."""
        with self._lock:
            return len(self._buffer)

    def flush(self, timeout: float | None = None) -> None:
        """Send everything buffered now, retrying for up to ``timeout`` seconds (default
        ``finish_timeout``). Raises the error of a failed background send, or
        :class:`BackendError` if points are still unsent (they stay buffered)."""
        self._send_all(self._finish_timeout if timeout is None else timeout)
        self._raise_pending()
        unsent = self.pending
        if unsent:
            raise BackendError(
                f"{unsent} metric point(s) of run {self.id} could not be sent yet "
                f"({self._last_failure}); they are kept and retried",
                unsent=unsent,
            )

    def finish(self, status: RunStatus | str = RunStatus.FINISHED) -> None:
        """Store every buffered point, then mark the run ``status``.

        Raises, naming how many points could not be stored, rather than mark a run finished with
        points missing; the run is then left open (its heartbeat stops, so it ends up crashed)
        and the unsent points stay buffered, so calling ``finish()`` again retries them.
        """
        if self._finished:
            return
        status = RunStatus(status)
        self._closing = True
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        self._send_all(self._finish_timeout)
        unsent, refused = self.pending, self._refused
        if unsent or refused:
            error = self._error or self._last_failure
            self._error = None
            what = []
            if unsent:
                what.append(f"{unsent} could not be sent ({self._last_failure})")
            if refused:
                what.append(f"{refused} were refused by the service ({error})")
            cls = BackendError if unsent or not isinstance(error, ShipyardError) else type(error)
            raise cls(
                f"run {self.id} was not marked {status.value}: of its metric points, "
                f"{' and '.join(what)}. Unsent points are kept; call finish() again once the "
                "server is reachable",
                unstored=unsent + refused,
            ) from error
        self._raise_pending()
        self._backend.finish_run(self.id, status=status, project=self.project)
        self._finished = True
        _open_runs.discard(self)

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
        self._beat()
        while not self._stop.is_set():
            beat_in = max(0.0, self._next_beat - time.monotonic())
            if self._failures:  # back off; a full buffer does not make the server come back
                backoff = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (self._failures - 1))
                self._stop.wait(min(backoff, beat_in))
            else:
                self._wake.wait(min(self._flush_interval, beat_in))
            self._wake.clear()
            if self._stop.is_set():
                break
            self._send()
            if time.monotonic() >= self._next_beat:
                self._beat()

    def _send_all(self, timeout: float) -> None:
        """Send until nothing is left, retrying with backoff until ``timeout`` has passed."""
        deadline = time.monotonic() + timeout
        delay = FIRST_BACKOFF_S
        while True:
            self._send()
            with self._lock:
                left = bool(self._buffer or self._params or self._tags)
            if not left or time.monotonic() + delay > deadline:
                return
            time.sleep(delay)
            delay = min(MAX_BACKOFF_S, delay * 2)

    def _send(self) -> bool:
        """Send buffered params, tags and points in batches; False if a send failed and must be
        retried (its points are back at the front of the buffer)."""
        with self._send_lock:
            with self._lock:
                params, self._params = self._params, {}
                tags, self._tags = self._tags, {}
            if params or tags:  # on their own, so a conflicting param never sinks metric points
                try:
                    self._backend.log_batch(
                        self.id, metrics=[], params=params, tags=tags, project=self.project
                    )
                except BaseException as exc:
                    if not _may_pass(exc):
                        self._error = exc  # a bad or conflicting param: the caller hears of it
                    else:
                        with self._lock:
                            self._params = {**params, **self._params}
                            self._tags = {**tags, **self._tags}
                        self._failed(exc)
                        return False
                else:
                    self._contact()
            while True:
                with self._lock:
                    n = min(self._batch, len(self._buffer))
                    chunk = [self._buffer.popleft() for _ in range(n)]
                if not chunk:
                    return True
                try:
                    result = self._backend.log_batch(self.id, metrics=chunk, project=self.project)
                except BaseException as exc:
                    if _too_large(exc) and len(chunk) > 1:
                        self._batch = max(1, len(chunk) // 2)
                        self._put_back(chunk)
                        continue
                    if _may_pass(exc):
                        self._put_back(chunk)
                        self._failed(exc)
                        return False
                    with self._room:
                        self._refused += len(chunk)
                        self._room.notify_all()
                    self._error = exc
                    continue
                self._stored(len(chunk), result)

    def _put_back(self, chunk: list[Point]) -> None:
        with self._lock:
            self._buffer.extendleft(reversed(chunk))

    def _failed(self, exc: BaseException) -> None:
        self._failures += 1
        self._last_failure = exc

    def _stored(self, sent: int, result: LogBatchResult | int) -> None:
        self._failures = 0
        self._contact()
        with self._room:
            self._room.notify_all()
        rejected = result.rejected if isinstance(result, LogBatchResult) else []
        if rejected:
            with self._lock:
                self._refused += len(rejected)
            named = ", ".join(f"{r.key!r} at step {r.step} ({r.reason})" for r in rejected[:5])
            more = f" and {len(rejected) - 5} more" if len(rejected) > 5 else ""
            self._error = InvalidInputError(
                f"the service rejected metric {named}{more}; the other points were stored",
                field="metrics",
            )

    def _beat(self) -> None:
        self._contact()  # the next beat is due an interval from now, whether this one lands
        try:
            self._backend.heartbeat(self.id, project=self.project)
        except Exception as exc:  # a missed beat is retried at the next one
            self._last_failure = exc

    def _contact(self) -> None:
        self._next_beat = time.monotonic() + self._heartbeat_interval

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _check_open(self) -> None:
        if self._finished or self._closing:
            raise InvalidStateError(f"run {self.id} is finished; start a new one with init()")


def _may_pass(exc: BaseException) -> bool:
    """Whether a failed send is worth retrying: the server unreachable or failing (5xx, 429,
    503), the database busy, a disk full. The service refusing the batch (4xx) and bugs are not.
    """
    if isinstance(exc, BackendError | StorageUnavailableError | StorageFullError):
        return True
    if isinstance(exc, ShipyardError):
        return type(exc) in (ShipyardError, IntegrityError)  # an unknown code, a 500
    return isinstance(exc, OSError | TimeoutError | OperationalError)


def _too_large(exc: BaseException) -> bool:
    return isinstance(exc, PayloadTooLargeError) or (
        isinstance(exc, InvalidInputError) and exc.field == "metrics" and "split" in exc.message
    )


_open_runs: weakref.WeakSet[ActiveRun] = weakref.WeakSet()


def init(
    *,
    project: str | None = None,
    name: str | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
    client: Client | None = None,
    flush_interval: float = 1.0,
    **options: Any,
) -> ActiveRun:
    """Start (or, inside a job, attach to) a run and return it.

    ``options`` go to :class:`ActiveRun` (``max_pending``, ``finish_timeout``,
    ``heartbeat_interval``, ...).
    """
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
        client,
        run.id,
        project=run.project,
        name=run.name,
        flush_interval=flush_interval,
        **options,
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
        with contextlib.suppress(Exception):
            run._stop.set()
        try:
            run.finish(RunStatus.FAILED if dying else RunStatus.FINISHED)
        except Exception as exc:  # at exit there is no caller left to raise to
            print(f"shipyard: could not finish run {run.id}: {exc}", file=sys.stderr)
