"""The app factory and ``serve``: safe binding, settings from the environment, the scheduler
thread's life."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from shipyard.context import Context
from shipyard.errors import InvalidInputError
from shipyard.server import create_app, serve
from shipyard.server.__main__ import main
from shipyard.server.app import _Ticker, check_bind, is_loopback
from shipyard.settings import Settings
from tests.conftest import wait_for
from tests.server.conftest import TestClient


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.com", "[::]"])
def test_serve_refuses_a_public_bind_without_auth(host: str, settings: Settings) -> None:
    with pytest.raises(InvalidInputError) as raised:
        serve(host=host, port=0, auth=False, settings=settings)
    assert raised.value.field == "host"
    assert "without auth" in raised.value.message and "--auth" in raised.value.message


def test_loopback_and_auth_are_what_make_a_bind_safe() -> None:
    for host in ("127.0.0.1", "127.5.5.5", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert is_loopback(host)
        check_bind(host, auth=False)
    for host in ("0.0.0.0", "10.0.0.1", "my-laptop", "localhost.evil.com"):
        assert not is_loopback(host)
        check_bind(host, auth=True)


def test_the_server_command_exits_non_zero_on_a_public_bind_without_auth(
    home_env: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SHIPYARD_AUTH"}
    result = subprocess.run(
        [sys.executable, "-m", "shipyard.server", "--host", "0.0.0.0", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "refusing to listen on '0.0.0.0' without auth" in result.stderr


def test_main_reports_bad_settings_with_exit_status_2(
    home_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SHIPYARD_AUTH", "perhaps")
    assert main(["--port", "0"]) == 2
    assert "SHIPYARD_AUTH='perhaps'" in capsys.readouterr().err
    monkeypatch.delenv("SHIPYARD_AUTH")
    assert main(["--host", "10.1.2.3", "--no-auth"]) == 2
    assert "refusing to listen on '10.1.2.3'" in capsys.readouterr().err


def test_create_app_reads_settings_from_the_environment(home_env: Path) -> None:
    with TestClient(create_app(scheduler=False)) as client:
        created = client.post("/api/v1/projects/default/runs", json={"name": "from-env"})
        assert created.status_code == 201
    assert (home_env / "shipyard.db").exists()


def test_limits_from_the_environment(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHIPYARD_MAX_BODY_MB", "0.001")  # about 1 KB
    with TestClient(create_app(settings, scheduler=False)) as client:
        response = client.post("/api/v1/projects/default/runs", json={"tags": {"t": "x" * 2000}})
        assert response.status_code == 413
    monkeypatch.setenv("SHIPYARD_MAX_BODY_MB", "lots")
    with pytest.raises(InvalidInputError) as raised:
        create_app(settings)
    assert raised.value.field == "SHIPYARD_MAX_BODY_MB"


def _scheduler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "shipyard-scheduler"]


def test_the_scheduler_thread_lives_as_long_as_the_app(settings: Settings) -> None:
    before = len(_scheduler_threads())
    with TestClient(create_app(settings)) as client:
        assert len(_scheduler_threads()) == before + 1
        assert client.get("/healthz").json()["status"] == "ok"
    wait_for(lambda: len(_scheduler_threads()) == before, timeout=10, what="thread stop")


def test_a_failing_tick_is_logged_and_the_next_one_runs(
    ctx: Context, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []

    def tick(c: Context) -> None:
        calls.append(c.actor)
        if len(calls) == 1:
            raise RuntimeError("first tick fails")

    ticker = _Ticker(tick, ctx.as_actor("system:scheduler"), interval=0.01)
    ticker.start()
    try:
        wait_for(lambda: len(calls) >= 3, timeout=10, what="three ticks")
    finally:
        ticker.stop()
    assert set(calls) == {"system:scheduler"}
    assert any("scheduler tick failed" in r.getMessage() for r in caplog.records)
    count = len(calls)
    assert not ticker._thread.is_alive()
    assert len(calls) == count


def test_metrics_endpoint_counts_requests_and_shows_job_states(client: TestClient) -> None:
    run_id = client.post("/api/v1/projects/default/runs", json={}).json()["id"]
    client.get(f"/api/v1/projects/default/runs/{run_id}")
    client.get("/api/v1/projects/default/runs/nope")
    client.get("/api/v1/projects/default/datasets/%2e%2e%2fetc")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    runs = "/api/v1/projects/{project}/runs"
    total = "shipyard_http_requests_total"
    assert f'{total}{{code="201",method="POST",route="{runs}"}} 1.0' in text
    assert f'{total}{{code="200",method="GET",route="{runs}/{{run_id}}"}} 1.0' in text
    assert f'{total}{{code="404",method="GET",route="{runs}/{{run_id}}"}} 1.0' in text
    assert 'code="400",method="GET",route="<unmatched>"' in text
    assert run_id not in text  # ids never become labels
    assert 'shipyard_jobs{state="queued"} 0.0' in text
    assert 'shipyard_runs{status="running"} 1.0' in text
    assert "shipyard_http_request_duration_seconds_bucket" in text
