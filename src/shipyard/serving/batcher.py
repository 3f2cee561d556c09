"""Adaptive batching: concurrent requests share one model call.

Each request is a dict of input name -> numpy array whose axis 0 is the batch dimension. The
batcher's loop takes the first queued request, then waits at most ``max_wait_ms`` for more, up to
``max_batch_size`` rows in all, concatenates the compatible ones along axis 0 (identical input
names, non-batch shapes and dtypes), runs the predict function once in a worker thread (ONNX
Runtime releases the GIL, so the event loop keeps accepting requests meanwhile) and splits every
output back to its request by row offsets. Under light load a request waits at most
``max_wait_ms``; under heavy load batches grow on their own while the previous one runs.

A model that is fast (a model call measured under ``inline_below_ms`` on average, 0.2 ms by
default) is not worth a thread hop: its batches run on the event loop itself. The first call
always goes to the thread, which measures it. The estimate for this choice is a slowly rising
minimum of the measured calls (it follows a faster call at once and a slower one by 5% a call),
so a call stretched by the machine's other load does not move a fast model to the thread, while
a model (or batch) that really gets slower moves back to it within a few dozen calls. Either way
a batch is only what is already queued when the loop gets to it (a lone request never waits for
company), so batching never makes a request slower than running it alone. :meth:`Batcher.enqueue`
queues a request without a coroutine (its future is the answer), for callers that count
microseconds.

A batch that fails, or whose outputs do not have one row per input row, is re-run one request at
a time, so one bad request never fails its neighbours and a model that is not batch-wise is still
answered correctly.

Load shedding: the queue is bounded in rows (``max_queue_rows``) and in time (``max_queue_ms``,
the longest a request may wait for its batch to start, and ``max_queue_calls``, the longest
predicted wait at admission counted in model calls). A request beyond either bound is refused
at once with :class:`OverloadedError` (HTTP 429 with ``Retry-After`` in the replica): when the
queue is full, or when the wait predicted from the recent model-call time and the rows ahead of
it would exceed the time bound; a request that still waits longer than that (the prediction was
low) is refused when it reaches the head of the queue instead of being run late. So under any
overload the requests that are admitted keep a bounded latency and the rest are answered fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from shipyard.errors import InvalidStateError, ShipyardError

Arrays = dict[str, np.ndarray]
PredictFn = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]
BatchObserver = Callable[[int, float], None]  # (rows in the batch, seconds the model took)

SHED_QUEUE_FULL = "queue_full"
SHED_QUEUE_TIME = "queue_time"
_EWMA = 0.2  # weight of the newest model call in the running estimate of a call's duration
_INLINE_RISE = 1.05  # how fast the inline estimate follows slower calls (x per call)
DEFAULT_INLINE_BELOW_MS = 0.2
# The calls-based bound never goes below this: on a busy machine a fast model's requests wait
# for the event loop and the GIL more than for the model, and that alone must not shed them.
QUEUE_FLOOR_S = 0.1


class OverloadedError(ShipyardError):
    """The request is shed: the queue is full or its wait would exceed the bound (HTTP 429).

    ``reason`` is :data:`SHED_QUEUE_FULL` or :data:`SHED_QUEUE_TIME`; ``retry_after`` is the
    whole number of seconds (at least 1) after which the queue should have drained.
    """

    code = "overloaded"
    http_status = 429

    def __init__(self, message: str, *, reason: str, retry_after: float) -> None:
        super().__init__(message, field=None, reason=reason)
        self.reason = reason
        self.retry_after = max(1, math.ceil(retry_after))


@dataclass
class _Pending:
    inputs: Mapping[str, np.ndarray]
    rows: int
    key: Hashable
    future: asyncio.Future[Arrays]
    enqueued: float = field(default_factory=time.monotonic)
    counted: bool = True  # its rows count in Batcher.queued_rows


class Batcher:
    """Queue requests and run them through ``predict`` in adaptive batches.

    A batch is the first waiting request plus whatever is already queued. It waits up to
    ``max_wait_ms`` for more only while callers have *announced* requests that are still on their
    way (being read and decoded; see :meth:`arriving`): a lone request never waits, so batching
    costs nothing at low load, and under load the batch fills while the model is busy.

    Start it inside the event loop that will call :meth:`submit` (``await batcher.start()``), and
    stop it with ``await batcher.stop()``; pending requests are failed on stop, not dropped.
    """

    def __init__(
        self,
        predict: PredictFn,
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        on_batch: BatchObserver | None = None,
        workers: int = 1,
        max_queue_rows: int | None = None,
        max_queue_ms: float | None = None,
        max_queue_calls: float | None = None,
        inline_below_ms: float = DEFAULT_INLINE_BELOW_MS,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms must not be negative")
        if max_queue_rows is not None and max_queue_rows < 1:
            raise ValueError("max_queue_rows must be at least 1")
        if max_queue_ms is not None and max_queue_ms <= 0:
            raise ValueError("max_queue_ms must be positive")
        if max_queue_calls is not None and max_queue_calls <= 0:
            raise ValueError("max_queue_calls must be positive")
        self.predict = predict
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue_rows = max_queue_rows
        self.max_queue = None if max_queue_ms is None else max_queue_ms / 1000.0
        self.max_queue_calls = max_queue_calls
        self.on_batch = on_batch
        self.batch_sizes: Counter[int] = Counter()  # rows per model call -> how many calls
        self._workers = workers
        self._executor: ThreadPoolExecutor | None = None
        self._queue: asyncio.Queue[_Pending] | None = None
        self._held: deque[_Pending] = deque()  # taken from the queue but left for the next batch
        self._current: list[_Pending] = []  # the batch being run
        self._task: asyncio.Task[None] | None = None
        self._arriving = 0
        self._queued_rows = 0  # rows submitted and not yet taken into a batch (or dropped)
        self._call_seconds: float | None = None  # running estimate of one model call
        self._call_started: float | None = None  # monotonic start of the call in progress
        self.inline_below = inline_below_ms / 1000.0
        self._inline_seconds: float | None = None  # slowly rising minimum of the call times

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request as on its way to :meth:`submit` (wrap its decoding, once its body is
        read: a request still being uploaded must not make batches wait for it)."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def queued_rows(self) -> int:
        """Rows waiting for a batch (not counting the batch being run)."""
        return self._queued_rows

    def expected_wait(self) -> float:
        """Seconds a request submitted now would wait for its batch to start (an estimate from
        the recent model-call time; 0 before the first call)."""
        per_call = self._call_seconds
        if per_call is None:
            return 0.0
        started = self._call_started
        remaining = 0.0 if started is None else max(0.0, per_call - (time.monotonic() - started))
        return remaining + (self._queued_rows // self.max_batch_size) * per_call

    def queue_time_limit(self) -> float | None:
        """The longest predicted wait for its batch at which a request is admitted, in seconds:
        the lower of ``max_queue_ms`` and ``max_queue_calls`` model calls (as recently measured,
        never below :data:`QUEUE_FLOOR_S`); None when neither bounds it. Counting in calls keeps
        an admitted request's latency a small multiple of the model's own, whatever the model's
        speed. A request already queued is shed only past ``max_queue_ms``."""
        limits = [] if self.max_queue is None else [self.max_queue]
        if self.max_queue_calls is not None and self._call_seconds is not None:
            limits.append(max(QUEUE_FLOOR_S, self.max_queue_calls * self._call_seconds))
        return min(limits) if limits else None

    def admit(self, rows: int = 1) -> None:
        """Raise :class:`OverloadedError` if a request of ``rows`` rows would be shed now.

        Cheap: call it before reading and decoding a request, to refuse it before that work.
        :meth:`submit` checks again.
        """
        queued = self._queued_rows
        if self.max_queue_rows is not None and queued and queued + rows > self.max_queue_rows:
            raise OverloadedError(
                f"the replica is overloaded: {queued} rows are queued and at most "
                f"{self.max_queue_rows} may be (--max-queue-rows); retry later",
                reason=SHED_QUEUE_FULL,
                retry_after=self._drain_seconds(),
            )
        limit = self.queue_time_limit()
        if limit is not None:
            wait = self.expected_wait()
            if wait > limit:
                raise OverloadedError(
                    f"the replica is overloaded: a request would wait about {wait * 1000:.0f} ms "
                    f"for the model, over the limit of {limit * 1000:.0f} ms "
                    "(--max-queue-ms, --max-queue-calls); retry later",
                    reason=SHED_QUEUE_TIME,
                    retry_after=self._drain_seconds(),
                )

    @property
    def inline(self) -> bool:
        """Whether model calls run on the event loop (measured fast), not in the thread."""
        per_call = self._inline_seconds
        return per_call is not None and per_call < self.inline_below

    async def start(self) -> None:
        if self.running:
            return
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="predict")
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        leftover = [*self._current, *self._held]
        self._current = []
        self._held.clear()
        self._queued_rows = 0
        while self._queue is not None and not self._queue.empty():
            leftover.append(self._queue.get_nowait())
        for item in leftover:
            if not item.future.done():
                item.future.set_exception(InvalidStateError("the replica is shutting down"))
        if self._executor is not None:
            # Do not block the event loop on a model call still running; its result is dropped.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def submit(self, inputs: Mapping[str, np.ndarray]) -> Arrays:
        """Queue one request and wait for its outputs (dict of output name -> array)."""
        return await self.enqueue(inputs)

    def enqueue(self, inputs: Mapping[str, np.ndarray]) -> asyncio.Future[Arrays]:
        """Queue one request; its outputs arrive in the returned future. Cancelling the future
        takes the request off the queue (it is not run). Raises :class:`OverloadedError` when
        the request is shed, InvalidStateError when the batcher is not running."""
        if not self.running or self._queue is None:
            raise InvalidStateError("the batcher is not running")
        rows, key = _batch_key(inputs)
        self.admit(rows)
        future: asyncio.Future[Arrays] = asyncio.get_running_loop().create_future()
        item = _Pending(inputs=inputs, rows=rows, key=key, future=future)
        self._queued_rows += rows
        # A caller that goes away (cancelled) frees its place in the queue at once.
        future.add_done_callback(lambda f: self._release(item) if f.cancelled() else None)
        self._queue.put_nowait(item)
        return future

    # --- the loop ---------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            batch = self._current = await self._collect()
            groups: dict[Hashable, list[_Pending]] = {}
            for item in batch:
                groups.setdefault(item.key, []).append(item)
            for group in groups.values():
                await self._run_group(group)
            self._current = []

    async def _collect(self) -> list[_Pending]:
        """The next batch: the first request plus whatever arrives within ``max_wait``."""
        assert self._queue is not None
        while True:
            first = self._held.popleft() if self._held else await self._queue.get()
            if self._take(first):
                break
        batch = [first]
        rows = first.rows
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while rows < self.max_batch_size:
            if self._held:
                item = self._held.popleft()
            else:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0 or self._arriving == 0:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), remaining)
                    except TimeoutError:
                        break
            if not self._take(item):  # the caller went away, or it waited too long
                continue
            if rows + item.rows > self.max_batch_size:
                item.counted = True
                self._queued_rows += item.rows
                self._held.appendleft(item)
                break
            batch.append(item)
            rows += item.rows
        return [item for item in batch if not item.future.done()]

    def _take(self, item: _Pending) -> bool:
        """Take ``item`` off the queue; False (and shed it) if it is done or waited too long."""
        self._release(item)
        if item.future.done():
            return False
        waited = time.monotonic() - item.enqueued
        # Only the absolute bound here: a wait counted in model calls is what admission
        # predicts, but a fast model's requests also wait for the event loop, not the model.
        if self.max_queue is not None and waited > self.max_queue:
            item.future.set_exception(
                OverloadedError(
                    f"the replica is overloaded: the request waited {waited * 1000:.0f} ms for "
                    f"the model, over the limit of {self.max_queue * 1000:.0f} ms "
                    "(--max-queue-ms); retry later",
                    reason=SHED_QUEUE_TIME,
                    retry_after=self._drain_seconds(),
                )
            )
            return False
        return True

    def _release(self, item: _Pending) -> None:
        if item.counted:
            item.counted = False
            self._queued_rows -= item.rows

    def _drain_seconds(self) -> float:
        """Seconds until everything queued now has started: what ``Retry-After`` says."""
        calls = math.ceil(self._queued_rows / self.max_batch_size)
        return self.expected_wait() + (calls - self._queued_rows // self.max_batch_size) * (
            self._call_seconds or 0.0
        )

    async def _run_group(self, group: list[_Pending]) -> None:
        if not group:
            return
        if len(group) == 1 or group[0].key is None:
            for item in group:
                await self._run_one(item)
            return
        names = list(group[0].inputs)
        merged = {
            name: np.concatenate([item.inputs[name] for item in group], axis=0) for name in names
        }
        total = sum(item.rows for item in group)
        try:
            outputs = await self._call(merged, total)
        except Exception:
            for item in group:  # isolate the failing request(s)
                await self._run_one(item)
            return
        if any(np.ndim(out) == 0 or np.shape(out)[0] != total for out in outputs.values()):
            for item in group:  # outputs are not per row: the model is not batch-wise
                await self._run_one(item)
            return
        offsets = np.cumsum([item.rows for item in group])[:-1]
        parts = {name: np.split(np.asarray(out), offsets, axis=0) for name, out in outputs.items()}
        for index, item in enumerate(group):
            if not item.future.done():
                item.future.set_result({name: pieces[index] for name, pieces in parts.items()})

    async def _run_one(self, item: _Pending) -> None:
        if item.future.done():
            return
        try:
            outputs = await self._call(item.inputs, item.rows)
        except Exception as exc:
            if not item.future.done():
                item.future.set_exception(exc)
            return
        if not item.future.done():
            item.future.set_result(outputs)

    async def _call(self, inputs: Mapping[str, np.ndarray], rows: int) -> Arrays:
        """One model call: on the event loop when the model is fast, else in the thread."""
        if self.inline:
            return self._timed(inputs, rows)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._timed, inputs, rows)

    def _timed(self, inputs: Mapping[str, np.ndarray], rows: int) -> Arrays:
        started = time.perf_counter()
        self._call_started = time.monotonic()
        try:
            outputs = {name: np.asarray(value) for name, value in self.predict(inputs).items()}
        finally:
            self._call_started = None
            elapsed = time.perf_counter() - started
            previous = self._call_seconds
            self._call_seconds = (
                elapsed if previous is None else (1 - _EWMA) * previous + _EWMA * elapsed
            )
            low = self._inline_seconds
            self._inline_seconds = elapsed if low is None else min(elapsed, low * _INLINE_RISE)
        self.batch_sizes[rows] += 1
        if self.on_batch is not None:
            self.on_batch(rows, elapsed)
        return outputs


def _batch_key(inputs: Mapping[str, np.ndarray]) -> tuple[int, Hashable]:
    """(rows, key): requests batch together only when their keys are equal and not None."""
    if not inputs:
        return 1, None
    shapes = [np.shape(a) for a in inputs.values()]
    if any(len(s) == 0 for s in shapes):
        return 1, None  # scalars have no batch dimension
    rows = shapes[0][0]
    if rows == 0 or any(s[0] != rows for s in shapes):
        return max(rows, 1), None  # empty, or inputs disagree on the batch size: run alone
    key = tuple(
        sorted(
            (name, tuple(np.shape(a)[1:]), np.asarray(a).dtype.str) for name, a in inputs.items()
        )
    )
    return rows, key
