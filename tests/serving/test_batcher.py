from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping

import numpy as np
import pytest

from shipyard.errors import InvalidStateError
from shipyard.serving.batcher import (
    SHED_QUEUE_FULL,
    SHED_QUEUE_TIME,
    Arrays,
    Batcher,
    OverloadedError,
)
from shipyard.serving.runtime import load_model
from tests.onnx_models import linear_model


def _rows(seed: int, rows: int, features: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, features)).astype(np.float32)


def test_concurrent_requests_share_batches_and_get_their_own_rows() -> None:
    model = linear_model()
    loaded = load_model(model.data)
    session = model.session()
    requests = [_rows(seed, rows=1 + seed % 3) for seed in range(24)]

    async def scenario() -> tuple[list[dict[str, np.ndarray]], Batcher]:
        batcher = Batcher(loaded.predict, max_batch_size=16, max_wait_ms=50)
        await batcher.start()
        try:
            results = await asyncio.gather(*(batcher.submit({"x": x}) for x in requests))
        finally:
            await batcher.stop()
        return results, batcher

    results, batcher = asyncio.run(scenario())
    assert max(batcher.batch_sizes) > 1, batcher.batch_sizes
    assert max(batcher.batch_sizes) <= 16
    assert sum(size * n for size, n in batcher.batch_sizes.items()) == sum(len(x) for x in requests)
    for x, result in zip(requests, results, strict=True):
        assert result["y"].shape == (len(x), 10)
        for row in range(len(x)):  # each row equals ONNX Runtime run on that row alone
            direct = session.run(["y"], {"x": x[row : row + 1]})[0]
            np.testing.assert_allclose(result["y"][row : row + 1], direct, rtol=1e-5, atol=1e-6)


def test_only_requests_with_identical_trailing_shapes_and_dtypes_are_merged() -> None:
    seen: list[tuple[tuple[int, ...], str]] = []

    def predict(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        seen.append((x.shape, x.dtype.str))
        return {"s": x.sum(axis=1)}

    requests = [
        np.full((1, 4), 1.0, dtype=np.float32),
        np.full((2, 5), 2.0, dtype=np.float32),
        np.full((1, 4), 3.0, dtype=np.float64),
        np.full((3, 4), 4.0, dtype=np.float32),
        np.full((1, 5), 5.0, dtype=np.float32),
    ]

    async def scenario() -> list[dict[str, np.ndarray]]:
        batcher = Batcher(predict, max_batch_size=32, max_wait_ms=50)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit({"x": x}) for x in requests))
        finally:
            await batcher.stop()

    results = asyncio.run(scenario())
    for x, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result["s"], x.sum(axis=1))
    # one call per (width, dtype) group: float32 width 4 (4 rows), width 5 (3 rows), float64
    assert sorted(seen) == sorted([((4, 4), "<f4"), ((3, 5), "<f4"), ((1, 4), "<f8")])


def test_max_batch_size_holds_requests_for_the_next_batch() -> None:
    sizes: list[int] = []

    def predict(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        sizes.append(len(inputs["x"]))
        return {"y": inputs["x"] * 2}

    requests = [np.full((3, 2), i, dtype=np.int64) for i in range(5)]

    async def scenario() -> list[dict[str, np.ndarray]]:
        batcher = Batcher(predict, max_batch_size=7, max_wait_ms=20)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit({"x": x}) for x in requests))
        finally:
            await batcher.stop()

    results = asyncio.run(scenario())
    assert max(sizes) <= 7 and sum(sizes) == 15
    for x, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result["y"], x * 2)


def test_a_failing_request_does_not_fail_its_neighbours() -> None:
    def predict(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if np.isnan(inputs["x"]).any():
            raise ValueError("NaN in the input")
        return {"y": inputs["x"] + 1}

    good = [np.full((1, 3), i, dtype=np.float32) for i in range(4)]
    bad = np.full((1, 3), np.nan, dtype=np.float32)

    async def scenario() -> list[object]:
        batcher = Batcher(predict, max_batch_size=8, max_wait_ms=50)
        await batcher.start()
        try:
            return await asyncio.gather(
                *(batcher.submit({"x": x}) for x in [*good[:2], bad, *good[2:]]),
                return_exceptions=True,
            )
        finally:
            await batcher.stop()

    results = asyncio.run(scenario())
    assert isinstance(results[2], ValueError)
    for x, result in zip(good, [*results[:2], *results[3:]], strict=True):
        assert isinstance(result, dict)
        np.testing.assert_array_equal(result["y"], x + 1)


def test_outputs_without_a_batch_dimension_are_computed_per_request() -> None:
    def predict(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"total": np.asarray(inputs["x"].sum())}

    requests = [np.full((2, 4), i, dtype=np.float32) for i in range(1, 5)]

    async def scenario() -> list[dict[str, np.ndarray]]:
        batcher = Batcher(predict, max_batch_size=32, max_wait_ms=50)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit({"x": x}) for x in requests))
        finally:
            await batcher.stop()

    results = asyncio.run(scenario())
    assert [float(r["total"]) for r in results] == [float(x.sum()) for x in requests]


def test_stop_fails_requests_that_are_still_waiting() -> None:
    entered = threading.Event()
    release = threading.Event()

    def predict(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        entered.set()
        release.wait(10)
        return {"y": inputs["x"]}

    async def scenario() -> list[object]:
        batcher = Batcher(predict, max_batch_size=1, max_wait_ms=0)
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit({"x": np.zeros((1, 1))}))
        second = asyncio.ensure_future(batcher.submit({"x": np.ones((1, 1))}))
        await asyncio.to_thread(entered.wait, 10)
        await batcher.stop()
        release.set()
        return await asyncio.gather(first, second, return_exceptions=True)

    results = asyncio.run(scenario())
    assert all(isinstance(r, InvalidStateError) for r in results), results


def test_submit_needs_a_started_batcher_and_sane_limits() -> None:
    batcher = Batcher(lambda inputs: dict(inputs))
    with pytest.raises(InvalidStateError, match="not running"):
        asyncio.run(batcher.submit({"x": np.zeros((1, 1))}))
    with pytest.raises(ValueError, match="max_batch_size"):
        Batcher(lambda inputs: dict(inputs), max_batch_size=0)


# --- load shedding (issue 5, item 15) -------------------------------------------------------


def _gated() -> tuple[threading.Event, threading.Event, list[int], Callable[..., Arrays]]:
    """A model whose calls block until ``release`` is set; ``entered`` once one has begun."""
    entered, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def predict(inputs: Mapping[str, np.ndarray]) -> Arrays:
        calls.append(len(inputs["x"]))
        entered.set()
        release.wait(10)
        return {"y": np.asarray(inputs["x"])}

    return entered, release, calls, predict


def test_a_full_queue_sheds_at_once_and_frees_its_place_when_a_caller_leaves() -> None:
    entered, release, calls, predict = _gated()

    async def scenario() -> tuple[list[object], OverloadedError, int]:
        batcher = Batcher(predict, max_batch_size=1, max_wait_ms=0, max_queue_rows=2)
        await batcher.start()
        try:
            running = asyncio.ensure_future(batcher.submit({"x": np.zeros((1, 1))}))
            await asyncio.to_thread(entered.wait, 10)  # the first request is with the model
            queued = [
                asyncio.ensure_future(batcher.submit({"x": np.full((1, 1), i)})) for i in (1, 2)
            ]
            await asyncio.sleep(0)  # let them enqueue
            assert batcher.queued_rows == 2
            with pytest.raises(OverloadedError) as shed:
                await batcher.submit({"x": np.full((1, 1), 3)})
            also_shed = asyncio.ensure_future(batcher.submit({"x": np.full((1, 1), 4)}))
            await asyncio.sleep(0)
            # a caller that goes away (cancelled: its client disconnected) frees its rows
            queued[1].cancel()
            await asyncio.gather(queued[1], return_exceptions=True)
            after_cancel = batcher.queued_rows
            release.set()
            results = await asyncio.gather(running, queued[0], also_shed, return_exceptions=True)
            return list(results), shed.value, after_cancel
        finally:
            release.set()
            await batcher.stop()

    results, shed, after_cancel = asyncio.run(scenario())
    assert shed.reason == SHED_QUEUE_FULL and shed.retry_after >= 1
    assert "2 rows are queued and at most 2" in shed.message
    # a task submitted while 2 were queued was shed too
    assert isinstance(results[2], OverloadedError), results
    assert after_cancel == 1
    assert [float(np.ravel(r["y"])[0]) for r in results[:2]] == [0.0, 1.0]  # type: ignore[index]
    assert calls == [1, 1]  # the shed and the cancelled requests never reached the model


def test_a_predicted_wait_over_max_queue_ms_is_shed_at_once() -> None:
    def slow_model(inputs: Mapping[str, np.ndarray]) -> Arrays:
        time.sleep(0.2)  # the model itself is slow: 200 ms a call
        return {"y": np.asarray(inputs["x"])}

    async def scenario() -> tuple[list[object], list[str]]:
        batcher = Batcher(slow_model, max_batch_size=1, max_wait_ms=0, max_queue_ms=300)
        await batcher.start()
        order: list[str] = []

        async def one(i: int) -> object:
            try:
                return await batcher.submit({"x": np.full((1, 1), i)})
            except OverloadedError as exc:
                return exc
            finally:
                order.append(str(i))

        try:
            await batcher.submit({"x": np.zeros((1, 1))})  # calibrates: one call takes ~200 ms
            # submitted in one go, before the batcher runs any: predicted waits 0, 200, 400, 600
            results = await asyncio.gather(*(one(i) for i in range(4)))
            return results, order
        finally:
            await batcher.stop()

    results, order = asyncio.run(scenario())
    assert [isinstance(r, dict) for r in results] == [True, True, False, False], results
    for shed in results[2:]:
        assert isinstance(shed, OverloadedError) and shed.reason == SHED_QUEUE_TIME
        assert "over the limit of 300 ms" in shed.message
    assert order[:2] == ["2", "3"]  # refused at once, before the admitted ones were answered


def test_a_request_that_waited_past_max_queue_ms_is_shed_not_run() -> None:
    entered, release, calls, predict = _gated()

    async def scenario() -> list[object]:
        batcher = Batcher(predict, max_batch_size=1, max_wait_ms=0, max_queue_ms=50)
        await batcher.start()
        try:
            # no model call has finished yet, so nothing predicts the wait: both are admitted
            first = asyncio.ensure_future(batcher.submit({"x": np.zeros((1, 1))}))
            await asyncio.to_thread(entered.wait, 10)
            second = asyncio.ensure_future(batcher.submit({"x": np.ones((1, 1))}))
            queued_at = time.monotonic()
            await asyncio.sleep(0.1)  # the model call outlasts the 50 ms the second may wait
            assert time.monotonic() - queued_at > 0.05
            release.set()
            return list(await asyncio.gather(first, second, return_exceptions=True))
        finally:
            release.set()
            await batcher.stop()

    first, second = asyncio.run(scenario())
    assert isinstance(first, dict)
    assert isinstance(second, OverloadedError) and second.reason == SHED_QUEUE_TIME
    assert "waited" in second.message and second.retry_after >= 1
    assert calls == [1]


def test_shedding_limits_must_be_sane() -> None:
    with pytest.raises(ValueError, match="max_queue_rows"):
        Batcher(lambda inputs: dict(inputs), max_queue_rows=0)
    with pytest.raises(ValueError, match="max_queue_ms"):
        Batcher(lambda inputs: dict(inputs), max_queue_ms=0)
    with pytest.raises(ValueError, match="max_queue_calls"):
        Batcher(lambda inputs: dict(inputs), max_queue_calls=0)


def test_the_wait_bound_in_model_calls_follows_the_models_speed() -> None:
    def model(seconds: float) -> Callable[[Mapping[str, np.ndarray]], Arrays]:
        def predict(inputs: Mapping[str, np.ndarray]) -> Arrays:
            time.sleep(seconds)
            return {"y": np.asarray(inputs["x"])}

        return predict

    async def scenario(seconds: float) -> tuple[list[object], float | None]:
        # a generous time bound: only the calls-based one (2.5 calls) can shed here
        batcher = Batcher(
            model(seconds), max_batch_size=1, max_wait_ms=0, max_queue_ms=60_000,
            max_queue_calls=2.5,
        )  # fmt: skip
        await batcher.start()
        try:
            assert batcher.queue_time_limit() == 60.0  # no call measured yet
            await batcher.submit({"x": np.zeros((1, 1))})  # calibrates the call time
            limit = batcher.queue_time_limit()

            async def one(i: int) -> object:
                try:
                    return await batcher.submit({"x": np.full((1, 1), i)})
                except OverloadedError as exc:
                    return exc

            # predicted waits 0, 1, 2, 3, 4, 5 calls: the first three are within 2.5 calls
            return list(await asyncio.gather(*(one(i) for i in range(6)))), limit
        finally:
            await batcher.stop()

    results, limit = asyncio.run(scenario(0.1))
    assert limit is not None and 0.2 < limit < 0.75  # 2.5 calls of ~100 ms
    assert [isinstance(r, dict) for r in results] == [True] * 3 + [False] * 3, results
    assert all(isinstance(r, OverloadedError) and r.reason == SHED_QUEUE_TIME for r in results[3:])
    assert "--max-queue-calls" in results[3].message  # type: ignore[union-attr]

    # a fast model: the bound never drops below the floor, so a short queue is not shed
    results, limit = asyncio.run(scenario(0.0005))
    assert limit == pytest.approx(0.1)
    assert all(isinstance(r, dict) for r in results), results


# --- no thread hop for a fast model (issue 8) -----------------------------------------------


def _threads_seen(seconds: float = 0.0) -> tuple[list[int], Callable[..., Arrays]]:
    """A model that records the thread of each call (and takes ``seconds`` of CPU)."""
    seen: list[int] = []

    def predict(inputs: Mapping[str, np.ndarray]) -> Arrays:
        seen.append(threading.get_ident())
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            pass
        return {"y": np.asarray(inputs["x"]) * 2}

    return seen, predict


def test_a_fast_model_runs_on_the_event_loop_after_its_first_measured_call() -> None:
    seen, predict = _threads_seen()

    async def scenario() -> tuple[int, list[Arrays], bool]:
        batcher = Batcher(predict, max_wait_ms=50)
        await batcher.start()
        try:
            outputs = [await batcher.submit({"x": _rows(i, 1)}) for i in range(5)]
            return threading.get_ident(), outputs, batcher.inline
        finally:
            await batcher.stop()

    loop_thread, outputs, inline = asyncio.run(scenario())
    assert inline
    assert seen[0] != loop_thread, "the first call (not yet measured) must go to the thread"
    assert seen[1:] == [loop_thread] * 4
    for i, out in enumerate(outputs):
        np.testing.assert_array_equal(out["y"], _rows(i, 1) * 2)


def test_requests_queued_together_still_share_one_inline_call() -> None:
    _seen, predict = _threads_seen()

    async def scenario() -> tuple[list[Arrays], Batcher]:
        batcher = Batcher(predict, max_batch_size=8)
        await batcher.start()
        try:
            await batcher.submit({"x": _rows(0, 1)})  # measured: inline from now on
            futures = [batcher.enqueue({"x": _rows(i, 1)}) for i in range(6)]  # one tick
            return list(await asyncio.gather(*futures)), batcher
        finally:
            await batcher.stop()

    outputs, batcher = asyncio.run(scenario())
    assert batcher.batch_sizes == {1: 1, 6: 1}
    for i, out in enumerate(outputs):
        np.testing.assert_array_equal(out["y"], _rows(i, 1) * 2)


def test_a_slow_model_stays_in_the_thread_and_inline_can_be_turned_off() -> None:
    async def scenario(seconds: float, inline_below_ms: float) -> tuple[int, list[int]]:
        seen, predict = _threads_seen(seconds)
        batcher = Batcher(predict, inline_below_ms=inline_below_ms)
        await batcher.start()
        try:
            for i in range(4):
                await batcher.submit({"x": _rows(i, 1)})
            return threading.get_ident(), seen
        finally:
            await batcher.stop()

    loop_thread, seen = asyncio.run(scenario(0.002, 0.2))  # 2 ms a call: over 0.2 ms
    assert loop_thread not in seen
    loop_thread, seen = asyncio.run(scenario(0.0, 0.0))  # instant, but inline turned off
    assert loop_thread not in seen


def test_cancelling_an_enqueued_request_takes_it_off_the_queue() -> None:
    entered, release, calls, predict = _gated()

    async def scenario() -> int:
        batcher = Batcher(predict, max_batch_size=4, max_wait_ms=0)
        await batcher.start()
        try:
            first = batcher.enqueue({"x": _rows(0, 1)})
            await asyncio.to_thread(entered.wait, 10)
            second = batcher.enqueue({"x": _rows(1, 1)})
            assert batcher.queued_rows == 1
            second.cancel()
            await asyncio.sleep(0)  # (done callbacks run on the next turn of the loop)
            assert batcher.queued_rows == 0
            release.set()
            await first
            return batcher.queued_rows
        finally:
            release.set()
            await batcher.stop()

    assert asyncio.run(scenario()) == 0
    assert calls == [1], "the cancelled request was run"
