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

Jobs that are preempted and requeued (or restarted) run again as a new *attempt* of the same job
(``SHIPYARD_ATTEMPT``, 1-based; ``run.attempt``) and attach to the same run:

- ``run.save_checkpoint(path, step=...)`` stores a file or a folder content-addressed (its files
  are blobs; unchanged files are not uploaded again); ``run.latest_checkpoint(dest)`` downloads
  the newest one, verified, and returns where it is (``None`` when the run has none yet).
- Automatic steps continue: an attached run's ``log()`` without ``step`` starts after the largest
  step any of its metric keys has stored, so the metric history of all attempts has no duplicate
  and no missing steps. Explicit steps are stored as given.
- Inside a job (``SHIPYARD_JOB_ID`` set), ``init()`` installs a SIGTERM handler (in the main
  thread; any previous handler is called after it): it sends the buffered metrics, waiting at most
  ``sigterm_timeout`` seconds, and exits with status 143 *without* finishing the run, so the next
  attempt re-attaches to a run that is still running. Outside jobs SIGTERM is left alone.

In a gang (``RANK`` set by the executor), every rank attaches to the job's one run, and only rank
0 logs metrics, params and tags and finishes the run; the other ranks' ``log()``,
``log_params()`` and ``set_tags()`` do nothing unless ``init(all_ranks=True)``. Inside a job every
rank also samples its own process's CPU use and resident memory every ``system_interval``
seconds (default 10) as ``system/rank{N}/cpu_percent`` and ``system/rank{N}/rss_mb``
(``init(system_metrics=False)`` or ``SHIPYARD_SYSTEM_METRICS=0`` turns it off).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import os
import signal
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil
from sqlalchemy.exc import OperationalError

from shipyard.client.backend import Backend
from shipyard.client.client import Client
from shipyard.domain.checkpoints import Checkpoint, CheckpointKind
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
from shipyard.security.paths import safe_join
from shipyard.settings import ENV_JOB_ID, ENV_RUN_ID
from shipyard.tracking.convert import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    convert_model,
    is_convertible,
    with_example,
)
from shipyard.tracking.formats import bundle_onnx_file
from shipyard.tracking.runs import ENV_RUN_GRACE, MAX_BATCH, parse_grace

DEFAULT_MAX_PENDING = 200_000
DEFAULT_FINISH_TIMEOUT_S = 60.0
MAX_BACKOFF_S = 5.0
FIRST_BACKOFF_S = 0.05
ENV_ATTEMPT = "SHIPYARD_ATTEMPT"
ENV_RANK = "RANK"
ENV_SYSTEM_METRICS = "SHIPYARD_SYSTEM_METRICS"
DEFAULT_SYSTEM_INTERVAL_S = 10.0
DEFAULT_SIGTERM_TIMEOUT_S = 5.0
SIGTERM_EXIT = 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM ended
SYSTEM_PREFIX = "system/"


class ActiveRun:
    """A run being logged to. Use as a context manager, or call :meth:`finish`.

    ``max_buffer``: send at once when this many points wait. ``max_pending``: the bound on
    buffered points; ``log()`` blocks while it is reached. ``finish_timeout``: how long
    ``finish()`` (and ``flush()``) keep retrying before they raise. ``heartbeat_interval``:
    seconds between heartbeats (default: a quarter of ``SHIPYARD_RUN_GRACE_S``, at most 10).

    ``attempt``: the job attempt this process is (``run.attempt``). ``last_steps``: the largest
    stored step of each metric key of an attached run; automatic steps continue after them.
    ``rank``: this process's rank in a gang; ``silent``: drop ``log()``, ``log_params()`` and
    ``set_tags()`` (a rank other than 0); ``owner``: whether ``finish()`` marks the run (rank 0
    does, the other ranks of a gang only flush). ``system_metrics``: sample this process's CPU
    and memory every ``system_interval`` seconds as ``system/rank{N}/...`` metrics.
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
        attempt: int = 1,
        last_steps: dict[str, int] | None = None,
        rank: int = 0,
        silent: bool = False,
        owner: bool = True,
        system_metrics: bool = False,
        system_interval: float = DEFAULT_SYSTEM_INTERVAL_S,
    ) -> None:
        if max_pending < 1 or max_batch < 1:
            raise InvalidInputError("max_pending and max_batch must be at least 1")
        if not system_interval > 0:
            raise InvalidInputError(
                f"system_interval must be a positive number of seconds, not {system_interval!r}",
                field="system_interval",
            )
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
        self.attempt = attempt
        self.rank = rank
        self._silent = silent
        self._owner = owner
        # re-entrant: the SIGTERM handler runs in the main thread, maybe while it holds them
        self._lock = threading.RLock()
        self._room = threading.Condition(self._lock)  # log() waits here while the buffer is full
        self._send_lock = threading.RLock()
        self._buffer: collections.deque[Point] = collections.deque()
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        steps = last_steps or {}
        ours = [v for k, v in steps.items() if not k.startswith(SYSTEM_PREFIX)]
        self._step = max(ours) + 1 if ours else 0  # automatic steps continue after the stored
        self._good_keys: set[str] = set()
        self._system_keys = (
            f"{SYSTEM_PREFIX}rank{rank}/cpu_percent",
            f"{SYSTEM_PREFIX}rank{rank}/rss_mb",
        )
        mine = [steps[k] for k in self._system_keys if k in steps]
        self._system_step = max(mine) + 1 if mine else 0
        self._system_interval = system_interval
        self._process: psutil.Process | None = None
        if system_metrics:
            self._process = psutil.Process()
            self._process.cpu_percent(None)  # the first call only starts the measurement
        self._next_sample = time.monotonic() + system_interval
        self._error: BaseException | None = None  # raised on the caller's next call
        self._last_failure: BaseException | None = None  # the last send that may pass
        self._refused = 0  # points the service refused for good
        self._failures = 0  # consecutive failed sends
        self._next_beat = 0.0
        self._closing = False
        self._finished = False
        self._detached = False  # left running for the job's next attempt (SIGTERM)
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
        Blocks while ``max_pending`` points are waiting to be sent. Does nothing on a gang rank
        other than 0 (unless ``init(all_ranks=True)``).
        """
        self._raise_pending()
        self._check_open()
        if self._silent:
            return
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
        if self._silent:
            return
        with self._lock:
            self._params.update({k: _text(v) for k, v in params.items()})
        self.flush()  # params are few and matter for reproducibility: send now

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._check_open()
        if self._silent:
            return
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
        model: str | Path | Any,
        *,
        name: str,
        example: Any = None,
        artifact_path: str = "model.onnx",
        register: bool = True,
        description: str = "",
        atol: float = DEFAULT_ATOL,
        rtol: float = DEFAULT_RTOL,
    ) -> ModelVersion | None:
        """Store a model as an ONNX artifact and (by default) register it as a model version.

        ``model`` is an ONNX file, or an object shipyard converts to ONNX itself: a fitted
        scikit-learn estimator or Pipeline (skl2onnx), a ``torch.nn.Module`` in eval mode, a
        ``torch.export.ExportedProgram``, or a ``.pt2`` file saved by ``torch.export.save``
        (see ``shipyard.tracking.convert``). ``example`` is a few rows of real input (required
        for estimators and modules): a converted model is run on it with ONNX Runtime and
        compared with the source model, and refused when any value differs by more than
        ``atol + rtol * |value|``. The version keeps the signature, the first rows of the
        example and that parity check. No pickle is written or read.

        The model is checked (and converted) before anything is stored, and nothing is stored
        when it is refused. Weights in an external data file next to an ONNX file (torch's
        default ``model.onnx.data`` sidecar) are bundled in: the stored model is self-contained.
        """
        validate_name(name, field="name")
        validate_relative_path(artifact_path, field="artifact_path")
        signature = None
        if is_convertible(model):
            converted = convert_model(model, example=example, atol=atol, rtol=rtol)
            content, signature = converted.content, converted.signature
        else:
            content = bundle_onnx_file(model, field="local_path")  # raises before storing
            if example is not None:
                signature = with_example(content, example)
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
            example=signature.example if signature is not None else None,
            parity=signature.parity if signature is not None else None,
        )

    def use_dataset(self, name: str, version: int | str | None = None) -> DatasetVersion:
        """Resolve a dataset version and record it as this run's input (lineage)."""
        dv = self._backend.get_dataset_version(project=self.project, name=name, version=version)
        self._backend.add_run_input(self.id, project=self.project, dataset=name, version=dv.version)
        return dv

    # --- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self, path: str | Path, *, step: int | None = None) -> Checkpoint:
        """Store a file or a folder as the run's next checkpoint, content-addressed, with the
        training ``step`` it holds and this process's attempt; returns the checkpoint.

        The metrics logged so far are sent first, so whatever resumes from this checkpoint finds
        them stored. An empty folder, a missing path, or a symlink pointing out of the folder is
        refused, and nothing is recorded.
        """
        self._check_open()
        if step is not None and (problem := step_problem(step)) is not None:
            raise InvalidInputError(f"{problem}; nothing was saved", field="step")
        self.flush()
        return self._backend.save_checkpoint(
            self.id, local_path=Path(path), step=step, attempt=self.attempt, project=self.project
        )

    def checkpoints(self) -> list[Checkpoint]:
        """The run's checkpoints, oldest first."""
        return self._backend.list_checkpoints(self.id, project=self.project)

    def latest_checkpoint(self, dest: str | Path | None = None) -> Path | None:
        """Restore the run's newest checkpoint and return where it is, or ``None`` when the run
        has none (a first attempt).

        A folder checkpoint's files are written under ``dest`` (files already there that the
        checkpoint does not hold are left alone) and ``dest`` is returned; a file checkpoint is
        written as ``dest/<its name>`` and that path is returned. Without ``dest``, a new
        temporary folder is used (the caller removes it). Each file is verified against its
        digest and written atomically; paths that would resolve outside ``dest`` are refused
        before anything is written.
        """
        checkpoint = self._backend.latest_checkpoint(self.id, project=self.project)
        if checkpoint is None:
            return None
        return restore_checkpoint(self._backend, checkpoint, dest)

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
        if self._finished or self._detached:
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
        if self._owner:  # a gang's other ranks leave the run to rank 0
            self._backend.finish_run(self.id, status=status, project=self.project)
        self._finished = True
        _open_runs.discard(self)

    def _flush_for_exit(self, timeout: float) -> int:
        """Send what is buffered within ``timeout`` seconds and leave the run running (the next
        attempt of the job re-attaches to it); returns how many points are left unsent."""
        deadline = time.monotonic() + timeout
        self._closing = True
        self._stop.set()
        self._wake.set()
        # The signal may have interrupted this thread inside log(), holding the buffer's lock,
        # while the sender waits for it: let go of it meanwhile, as Condition.wait does, and take
        # it back before returning into the interrupted frame.
        lock: Any = self._lock
        saved = lock._release_save() if lock._is_owned() else None
        try:
            if self._thread is not threading.current_thread():
                self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
            if self._send_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                try:
                    self._send_all(max(0.0, deadline - time.monotonic()))
                finally:
                    self._send_lock.release()
        finally:
            if saved is not None:
                lock._acquire_restore(saved)
        self._detached = True
        _open_runs.discard(self)
        return self.pending

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
            if self._process is not None:
                beat_in = min(beat_in, max(0.0, self._next_sample - time.monotonic()))
            if self._failures:  # back off; a full buffer does not make the server come back
                backoff = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (self._failures - 1))
                self._stop.wait(min(backoff, beat_in))
            else:
                self._wake.wait(min(self._flush_interval, beat_in))
            self._wake.clear()
            if self._stop.is_set():
                break
            if self._process is not None and time.monotonic() >= self._next_sample:
                self._sample_system()
            self._send()
            if time.monotonic() >= self._next_beat:
                self._beat()

    def _sample_system(self) -> None:
        """Buffer this process's CPU use and resident memory (skipped while the buffer is full:
        the sender never blocks on its own samples)."""
        self._next_sample = time.monotonic() + self._system_interval
        assert self._process is not None
        try:
            cpu = float(self._process.cpu_percent(None))
            rss_mb = self._process.memory_info().rss / (1024 * 1024)
        except psutil.Error:
            return
        now = time.time()
        cpu_key, rss_key = self._system_keys
        with self._room:
            if len(self._buffer) + 2 > self._max_pending:
                return
            step, self._system_step = self._system_step, self._system_step + 1
            self._buffer.append(Point(cpu_key, cpu, step, now))
            self._buffer.append(Point(rss_key, rss_mb, step, now))

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
                    if not isinstance(exc, Exception):  # SystemExit from the SIGTERM handler
                        with self._lock:
                            self._params = {**params, **self._params}
                            self._tags = {**tags, **self._tags}
                        raise
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
                    if not isinstance(exc, Exception):  # SystemExit from the SIGTERM handler
                        self._put_back(chunk)
                        raise
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
        if self._detached:
            raise InvalidStateError(
                f"run {self.id} was left running for the job's next attempt (SIGTERM)"
            )
        if self._finished or self._closing:
            raise InvalidStateError(f"run {self.id} is finished; start a new one with init()")


def restore_checkpoint(
    backend: Backend, checkpoint: Checkpoint, dest: str | Path | None = None
) -> Path:
    """Write ``checkpoint``'s files (verified) under ``dest`` (a new temp folder when None);
    returns the folder, or for a file checkpoint the file."""
    root = Path(dest) if dest is not None else Path(tempfile.mkdtemp(prefix="shipyard-ckpt-"))
    root.mkdir(parents=True, exist_ok=True)
    targets = [(entry, safe_join(root, entry.path, field="path")) for entry in checkpoint.files]
    for entry, target in targets:
        backend.download_blob(entry.digest, target, project=checkpoint.project)
    if checkpoint.kind is CheckpointKind.FILE:
        return root / checkpoint.files[0].path
    return root


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
    all_ranks: bool = False,
    system_metrics: bool | None = None,
    sigterm_timeout: float = DEFAULT_SIGTERM_TIMEOUT_S,
    **options: Any,
) -> ActiveRun:
    """Start (or, inside a job, attach to) a run and return it.

    Attached to a job's run (``SHIPYARD_RUN_ID``), automatic steps continue after the steps the
    run has stored, ``run.attempt`` is ``SHIPYARD_ATTEMPT``, and in a gang only ``RANK`` 0 logs
    (``all_ranks=True``: every rank does). Inside a job, a SIGTERM sends the buffered metrics
    (for at most ``sigterm_timeout`` seconds) and exits 143 leaving the run running, and
    ``system_metrics`` (default: on in a job, unless ``SHIPYARD_SYSTEM_METRICS=0``) samples
    this process's CPU and memory. ``options`` go to :class:`ActiveRun` (``max_pending``,
    ``finish_timeout``, ``heartbeat_interval``, ``system_interval``, ...).
    """
    attempt = _env_int(ENV_ATTEMPT, default=1, least=1)
    rank = _env_int(ENV_RANK, default=0, least=0)
    in_job = bool(os.environ.get(ENV_JOB_ID))
    if system_metrics is None:
        off = os.environ.get(ENV_SYSTEM_METRICS, "").strip().lower() in ("0", "false", "no", "off")
        system_metrics = in_job and not off
    client = client or Client()
    attach_to = os.environ.get(ENV_RUN_ID)
    last_steps: dict[str, int] = {}
    if attach_to:
        run = client.backend.get_run(attach_to)
        last_steps = client.backend.last_steps(run.id, project=run.project)
    else:
        run = client.backend.create_run(
            project=project or client.project,
            name=name,
            tags={k: _text(v) for k, v in (tags or {}).items()},
        )
    gang_rank = bool(attach_to) and rank != 0  # other ranks of a gang share rank 0's run
    active = ActiveRun(
        client,
        run.id,
        project=run.project,
        name=run.name,
        flush_interval=flush_interval,
        attempt=attempt,
        last_steps=last_steps,
        rank=rank,
        silent=gang_rank and not all_ranks,
        owner=not gang_rank,
        system_metrics=system_metrics,
        **options,
    )
    if in_job:
        _install_sigterm_handler(sigterm_timeout)
    if attach_to and tags:
        active.set_tags(tags)
    if params:
        active.log_params(params)
    return active


def _env_int(name: str, *, default: int, least: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = least - 1
    if value < least:
        raise InvalidInputError(
            f"{name}={raw!r} must be a whole number, at least {least} (the job's executor sets "
            "it; unset it to run outside a job)",
            field=name,
        )
    return value


_sigterm = {"installed": False, "timeout": DEFAULT_SIGTERM_TIMEOUT_S}


def _install_sigterm_handler(timeout: float) -> None:
    """Once per process, from the main thread (Python handles signals there only): on SIGTERM,
    flush every open run within ``timeout`` seconds, leave them running, call the handler that
    was installed before, then exit 143."""
    _sigterm["timeout"] = timeout
    if _sigterm["installed"] or threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        deadline = time.monotonic() + float(_sigterm["timeout"])
        for run in list(_open_runs):
            left = run._flush_for_exit(max(0.0, deadline - time.monotonic()))
            note = f"; {left} metric point(s) could not be sent in time" if left else ""
            print(
                f"shipyard: SIGTERM: run {run.id} flushed and left running for the job's next "
                f"attempt{note}",
                file=sys.stderr,
                flush=True,
            )
        if callable(previous):
            previous(signum, frame)
        raise SystemExit(SIGTERM_EXIT)

    signal.signal(signal.SIGTERM, on_sigterm)
    _sigterm["installed"] = True


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
