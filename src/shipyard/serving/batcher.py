"""Adaptive batching: concurrent requests share one model call.

Each request is a dict of input name -> numpy array whose axis 0 is the batch dimension. The
batcher's loop takes the first queued request, then waits at most ``max_wait_ms`` for more, up to
``max_batch_size`` rows in all, concatenates the compatible ones along axis 0 (identical input
names, non-batch shapes and dtypes), runs the predict function once in a worker thread (ONNX
Runtime releases the GIL, so the event loop keeps accepting requests meanwhile) and splits every
output back to its request by row offsets. Under light load a request waits at most
``max_wait_ms``; under heavy load batches grow on their own while the previous one runs.

A batch that fails, or whose outputs do not have one row per input row, is re-run one request at
a time, so one bad request never fails its neighbours and a model that is not batch-wise is still
answered correctly.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from shipyard.errors import InvalidStateError

Arrays = dict[str, np.ndarray]
PredictFn = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]
BatchObserver = Callable[[int, float], None]  # (rows in the batch, seconds the model took)


@dataclass
class _Pending:
    inputs: Mapping[str, np.ndarray]
    rows: int
    key: Hashable
    future: asyncio.Future[Arrays]
    enqueued: float = field(default_factory=time.monotonic)


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
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms must not be negative")
        self.predict = predict
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.on_batch = on_batch
        self.batch_sizes: Counter[int] = Counter()  # rows per model call -> how many calls
        self._workers = workers
        self._executor: ThreadPoolExecutor | None = None
        self._queue: asyncio.Queue[_Pending] | None = None
        self._held: deque[_Pending] = deque()  # taken from the queue but left for the next batch
        self._current: list[_Pending] = []  # the batch being run
        self._task: asyncio.Task[None] | None = None
        self._arriving = 0

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request as on its way to :meth:`submit` (wrap its reading and decoding)."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

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
        if not self.running or self._queue is None:
            raise InvalidStateError("the batcher is not running")
        rows, key = _batch_key(inputs)
        future: asyncio.Future[Arrays] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(inputs=inputs, rows=rows, key=key, future=future))
        return await future

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
        first = self._held.popleft() if self._held else await self._queue.get()
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
            if item.future.done():  # the caller went away (cancelled)
                continue
            if rows + item.rows > self.max_batch_size:
                self._held.appendleft(item)
                break
            batch.append(item)
            rows += item.rows
        return [item for item in batch if not item.future.done()]

    async def _run_group(self, group: list[_Pending]) -> None:
        if not group:
            return
        loop = asyncio.get_running_loop()
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
            outputs = await loop.run_in_executor(self._executor, self._timed, merged, total)
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
        loop = asyncio.get_running_loop()
        try:
            outputs = await loop.run_in_executor(
                self._executor, self._timed, item.inputs, item.rows
            )
        except Exception as exc:
            if not item.future.done():
                item.future.set_exception(exc)
            return
        if not item.future.done():
            item.future.set_result(outputs)

    def _timed(self, inputs: Mapping[str, np.ndarray], rows: int) -> Arrays:
        started = time.perf_counter()
        outputs = {name: np.asarray(value) for name, value in self.predict(inputs).items()}
        elapsed = time.perf_counter() - started
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
