"""The SDK never loses a metric point (issue 5, items 1-4), embedded and through a real server.

- a tight loop of 10 keys x 100k steps: every point stored and read back (item 1);
- a server that goes away and comes back: every point stored; one that never comes back:
  ``finish()`` raises with the count and the run is not finished (item 2);
- NaN and +-Infinity round-trip; a bad value is rejected alone, naming key and step (item 3);
- a process killed with SIGKILL mid-run has its run marked crashed (item 4).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

import shipyard
from shipyard.client import Client, HttpBackend, LocalBackend
from shipyard.client.tracking import ActiveRun
from shipyard.context import Context
from shipyard.domain.models import RunStatus
from shipyard.errors import BackendError, InvalidInputError
from shipyard.settings import Settings
from shipyard.tracking import runs
from tests.conftest import LiveServer, wait_for

KEYS = 10
STEPS = 100_000


@pytest.fixture(params=["embedded", "server"])
def client(request: pytest.FixtureRequest, ctx: Context, tmp_path: Path) -> Iterator[Client]:
    if request.param == "embedded":
        yield Client(settings=ctx.settings, backend=LocalBackend(ctx))
        return
    home = tmp_path / "server-home"
    home.mkdir()
    server = LiveServer(home)
    backend = HttpBackend(server.url)
    try:
        yield Client(settings=Settings(home=home, url=server.url), backend=backend)
    finally:
        backend.close()
        server.stop()


@pytest.mark.slow
def test_a_tight_loop_of_a_million_points_loses_none(client: Client) -> None:
    keys = [f"m{k}" for k in range(KEYS)]
    started = time.monotonic()
    with shipyard.init(project="p", client=client, max_pending=50_000) as run:
        for step in range(STEPS):
            run.log(dict.fromkeys(keys, float(step)), step=step)
            assert run.pending <= 50_000  # memory stays bounded: log() waited for room
    logged = time.monotonic() - started

    stored = 0
    for key in keys:
        history = client.backend.metric_history(run.id, key=key, project="p")
        assert [p.step for p in history] == list(range(STEPS)), key
        assert all(p.value == p.step for p in history)
        stored += len(history)
    assert stored == KEYS * STEPS  # points stored / points logged = 100%
    assert client.runs.get(run.id, project="p").status == RunStatus.FINISHED
    print(f"\n{KEYS * STEPS} points logged and stored in {logged:.1f}s")


def test_nan_and_infinities_round_trip(client: Client) -> None:
    with shipyard.init(project="p", client=client) as run:
        run.log({"loss": 1.0, "nan": math.nan}, step=0)
        run.log({"loss": math.inf, "neg": -math.inf}, step=1)
    history = [p.value for p in client.backend.metric_history(run.id, key="loss", project="p")]
    assert history == [1.0, math.inf]
    latest = client.runs.get(run.id, project="p").metrics
    assert math.isnan(latest["nan"]) and latest["loss"] == math.inf and latest["neg"] == -math.inf
    listed = client.runs.list(project="p")[0].metrics
    assert math.isnan(listed["nan"])


@pytest.mark.parametrize("bad", ["abc", True, None, [1.0], 1j])
def test_a_bad_value_is_rejected_alone_naming_key_and_step(client: Client, bad: object) -> None:
    with shipyard.init(project="p", client=client) as run:
        run.log({"good": 1.0}, step=0)
        with pytest.raises(InvalidInputError, match=r"'bad' .* at step 1 was not logged") as info:
            run.log({"bad": bad, "good": 2.0, "also": math.nan}, step=1)  # type: ignore[dict-item]
        assert info.value.field == "metrics" and "other 2 value(s)" in info.value.message
    history = client.backend.metric_history(run.id, key="good", project="p")
    assert [(p.step, p.value) for p in history] == [(0, 1.0), (1, 2.0)]
    assert client.backend.metric_history(run.id, key="bad", project="p") == []
    assert client.runs.get(run.id, project="p").status == RunStatus.FINISHED


def test_the_rest_api_rejects_a_bad_value_alone(live_server: LiveServer) -> None:
    backend = HttpBackend(live_server.url)
    try:
        run = backend.create_run(project="p")
        url = f"{live_server.url}/api/v1/projects/p/runs/{run.id}/log-batch"
        now = time.time()
        body = {
            "metrics": [
                {"key": "x", "value": 1.5, "step": 0, "timestamp": now},
                {"key": "x", "value": "oops", "step": 1, "timestamp": now},
                {"key": "x", "value": None, "step": 2, "timestamp": now},
                {"key": "x", "value": "NaN", "step": 3, "timestamp": now},
                {"key": "x", "value": "-Infinity", "step": 4, "timestamp": now},
            ]
        }
        answer = httpx.post(url, json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        got = answer.json()
        assert got["stored"] == 3
        assert [(r["key"], r["step"]) for r in got["rejected"]] == [("x", 1), ("x", 2)]
        history = backend.metric_history(run.id, key="x", project="p")
        assert [p.step for p in history] == [0, 3, 4]
        assert math.isnan(history[1].value) and history[2].value == -math.inf
        raw = httpx.get(f"{url.removesuffix('/log-batch')}/metrics", params={"key": "x"}).json()
        assert [p["value"] for p in raw] == [1.5, "NaN", "-Infinity"]  # JSON has no NaN
    finally:
        backend.close()


# --- item 2: outages ---------------------------------------------------------------------------


def test_points_logged_during_a_server_outage_are_all_stored(tmp_path: Path) -> None:
    home = tmp_path / "server-home"
    home.mkdir()
    server = LiveServer(home)
    backend = HttpBackend(server.url)
    client = Client(settings=Settings(home=home, url=server.url), backend=backend)
    try:
        run = shipyard.init(project="p", client=client, flush_interval=0.05)
        for step in range(100):
            run.log({"x": float(step)}, step=step)
        run.flush()
        server.stop()  # the outage
        for step in range(100, 300):
            run.log({"x": float(step)}, step=step)
        wait_for(lambda: run._failures > 0, timeout=30, what="a failed send")
        server = LiveServer(home, port=server.port)  # back, on the same address
        run.finish()
        history = backend.metric_history(run.id, key="x", project="p")
        assert [p.step for p in history] == list(range(300))
        assert backend.get_run(run.id, project="p").status == RunStatus.FINISHED
    finally:
        backend.close()
        server.stop()


def test_finish_raises_with_the_count_when_the_server_never_comes_back(tmp_path: Path) -> None:
    home = tmp_path / "server-home"
    home.mkdir()
    server = LiveServer(home)
    backend = HttpBackend(server.url)
    client = Client(settings=Settings(home=home, url=server.url), backend=backend)
    try:
        run = shipyard.init(project="p", client=client, flush_interval=0.05, finish_timeout=1.0)
        run.log({"x": 0.0}, step=0)
        run.flush()
        server.stop()
        for step in range(1, 51):
            run.log({"x": float(step)}, step=step)
        with pytest.raises(BackendError, match="50 could not be sent") as info:
            run.finish()
        assert info.value.details["unstored"] == 50
        assert run.pending == 50  # kept, not dropped

        server = LiveServer(home, port=server.port)
        assert backend.get_run(run.id, project="p").status == RunStatus.RUNNING  # not finished
        assert len(backend.metric_history(run.id, key="x", project="p")) == 1
        run.finish()  # the server is back: a second finish() stores the kept points
        assert len(backend.metric_history(run.id, key="x", project="p")) == 51
        assert backend.get_run(run.id, project="p").status == RunStatus.FINISHED
    finally:
        backend.close()
        server.stop()


def test_log_blocks_at_the_bound_instead_of_growing_or_dropping(ctx: Context) -> None:
    client = Client(settings=ctx.settings, backend=LocalBackend(ctx))
    run = shipyard.init(project="p", client=client, max_pending=10, max_buffer=10)
    assert isinstance(run, ActiveRun)
    with run._send_lock:  # the sender is stuck (a slow server)
        for step in range(10):
            run.log({"x": 1.0}, step=step)
        blocked = threading.Thread(target=run.log, args=({"x": 2.0},), kwargs={"step": 10})
        blocked.start()
        blocked.join(timeout=0.3)
        assert blocked.is_alive() and run.pending == 10  # waiting for room, nothing dropped
    blocked.join(timeout=30)
    assert not blocked.is_alive()
    run.finish()
    assert len(client.backend.metric_history(run.id, key="x", project="p")) == 11


# --- item 4: a process killed mid-run ----------------------------------------------------------

CHILD = """
import sys, time
import shipyard
run = shipyard.init(project="p", heartbeat_interval=0.2)
run.log({"x": 1.0})
run.flush()
print(run.id, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("where", ["embedded", "server"])
def test_a_run_killed_with_sigkill_is_marked_crashed(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv(runs.ENV_RUN_GRACE, "1")
    server = LiveServer(home, env={runs.ENV_RUN_GRACE: "1"}) if where == "server" else None
    env = {**os.environ, "SHIPYARD_HOME": str(home), runs.ENV_RUN_GRACE: "1"}
    env.pop("SHIPYARD_URL", None)
    if server is not None:
        env["SHIPYARD_URL"] = server.url
    client = Client(settings=Settings(home=home, url=server.url if server else None))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        run_id = child.stdout.readline().strip()
        first = client.runs.get(run_id, project="p").heartbeat_at
        assert first is not None
        # alive: it keeps beating, and is not marked crashed although the grace is 1 s
        wait_for(
            lambda: (client.runs.get(run_id, project="p").heartbeat_at or first) > first,
            timeout=30,
            what="a second heartbeat",
        )
        # alive for longer than the grace: a live process is never marked crashed
        wait_for(
            lambda: (
                (client.runs.get(run_id, project="p").heartbeat_at or first)
                > first + timedelta(seconds=1.5)
            ),
            timeout=30,
            what="heartbeats past the grace period",
        )
        assert client.runs.get(run_id, project="p").status == RunStatus.RUNNING

        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        wait_for(
            lambda: client.runs.get(run_id, project="p").status == RunStatus.CRASHED,
            timeout=30,
            what="the run marked crashed",
        )
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        client.close()
        if server is not None:
            server.stop()
