from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping

import numpy as np
import pytest

from shipyard.errors import InvalidStateError
from shipyard.serving.batcher import Batcher
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
