"""The gateway: one front door on the server, with auth, weighted routing, request ids, the
serving version named, and retries when a replica dies under load. Real server, real replicas."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy import update

from shipyard.context import Context
from shipyard.domain.models import (
    DeploymentSpec,
    DeploymentStatus,
    DeploymentTarget,
    ReplicaState,
)
from shipyard.errors import NotFoundError, PermissionDeniedError
from shipyard.security import tokens
from shipyard.security.principals import (
    create_principal,
    issue_job_token,
    remove_member,
    revoke_job_tokens_in,
    set_member,
)
from shipyard.security.tokens import (
    authenticate,
    create_token,
    forget_verified,
    verified_principal,
)
from shipyard.serving import launcher, reconciler
from shipyard.serving._proxy import ConnectFailed, Dropped, Pool, ReadTimeout
from shipyard.store.queries import project_id
from shipyard.store.tables import TokenRow, utcnow
from shipyard.tracking.registry import register_version, set_alias
from tests.conftest import wait_for
from tests.onnx_models import LinearModel, linear_model
from tests.serving.gateway_helpers import Load, ThreadServer, request_body
from tests.serving.test_deployments import stop_stray_replicas

MODELS = {1: linear_model(seed=21), 2: linear_model(seed=22)}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    """A server with deployment 'web' of 'digits': v1 and v2, 50% each, one replica each."""
    home = Path(tmp_path_factory.mktemp("gateway")) / "home"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reconciler, "RESTART_BACKOFF_S", 0.2)
        running = ThreadServer(home)
        ctx = running.ctx
        for linear in MODELS.values():
            digest = ctx.blobs.put_bytes(linear.data).digest
            register_version(ctx, project="default", model="digits", digest=digest)
        set_alias(ctx, project="default", model="digits", alias="production", version=1)
        spec = DeploymentSpec(
            targets=[
                DeploymentTarget(alias="production", weight=50),
                DeploymentTarget(version=2, weight=50),
            ]
        )
        with running.client() as client:
            deployed = client.deployments.create("web", model="digits", spec=spec, timeout=90)
        assert deployed.status is DeploymentStatus.RUNNING, deployed.message
        yield running
        with running.client() as client:
            client.deployments.stop("web")
        running.stop()
    stop_stray_replicas()


def expected(version: int, x: np.ndarray) -> np.ndarray:
    linear: LinearModel = MODELS[version]
    return linear.reference(x)


def test_predict_through_the_gateway_names_the_version_and_carries_the_request_id(
    server: ThreadServer,
) -> None:
    x = np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)
    with server.client(server.reader_token) as reader:
        deployment = reader.deployments.get("web")
        assert deployment.url == server.url  # the gateway, not a replica
        answer = reader.deployments.predict("web", request_body(x), request_id="req-1")
    version = int(answer["model_version"])
    assert answer["shipyard"] == {"request_id": "req-1", "model_version": str(version)}
    out = answer["outputs"][0]
    got = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    np.testing.assert_array_equal(got, expected(version, x))

    auth = {"Authorization": f"Bearer {server.reader_token}"}
    for path in ("/v2/models/web/infer", "/projects/default/v2/models/web/infer"):
        raw = httpx.post(f"{server.url}{path}", json=request_body(x), headers=auth)
        assert raw.status_code == 200, raw.text
        assert raw.headers["x-request-id"]  # one is made when the caller sends none
        assert raw.headers["x-shipyard-model-version"] == raw.json()["model_version"]
    meta = httpx.get(f"{server.url}/v2/models/web", headers=auth)
    assert meta.status_code == 200 and meta.json()["name"] == "web"

    refused = httpx.post(f"{server.url}/v2/models/web/infer", json=request_body(x))
    assert refused.status_code == 401
    missing = httpx.post(f"{server.url}/v2/models/nope/infer", json={}, headers=auth)
    assert missing.status_code == 404 and "'nope' does not exist" in missing.text
    other = httpx.post(f"{server.url}/projects/secret/v2/models/web/infer", json={}, headers=auth)
    assert other.status_code == 404  # a project the token cannot see does not exist for it
    bad = httpx.post(f"{server.url}/v2/models/web/infer", json={"inputs": []}, headers=auth)
    assert bad.status_code == 400  # the replica's own OIP error, passed through
    with server.client(server.reader_token) as reader:
        with pytest.raises(PermissionDeniedError):  # a viewer may predict, not deploy
            reader.deployments.scale("web", min=2)
        with pytest.raises(NotFoundError):
            reader.deployments.predict("nope", request_body(x))


def test_traffic_follows_the_weights(server: ThreadServer) -> None:
    auth = {"Authorization": f"Bearer {server.reader_token}"}
    body = request_body(np.zeros((1, 64), dtype=np.float32))
    served: Counter[str] = Counter()
    with httpx.Client(headers=auth) as client:
        for _ in range(20):
            r = client.post(f"{server.url}/v2/models/web/infer", json=body)
            assert r.status_code == 200, r.text
            served[r.headers["x-shipyard-model-version"]] += 1
    assert served == {"1": 10, "2": 10}


def test_the_cli_predicts_against_a_remote_server_with_a_token(
    server: ThreadServer, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "SHIPYARD_URL": server.url,
        "SHIPYARD_TOKEN": server.reader_token,
        "SHIPYARD_HOME": str(tmp_path / "cli-home"),
    }
    rows = [[0.25] * 64]
    out = subprocess.run(
        [sys.executable, "-m", "shipyard.cli", "predict", "web", "--data", json.dumps(rows),
         "--request-id", "cli-1"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["shipyard"]["request_id"] == "cli-1"
    version = int(answer["model_version"])
    got = np.asarray(answer["outputs"][0]["data"], dtype=np.float32)
    np.testing.assert_allclose(got, expected(version, np.asarray(rows, np.float32)).ravel())


def test_a_replica_that_dies_under_load_costs_no_request_and_is_restarted(
    server: ThreadServer,
) -> None:
    with server.client() as client:
        before = {r.version: r for r in client.deployments.get("web").replicas}
        victim = before[1]
        assert victim.pid is not None and victim.state is ReplicaState.READY
        with Load(f"{server.url}/v2/models/web/infer", server.reader_token) as load:
            load.wait_for_more(20)
            os.killpg(victim.pid, signal.SIGKILL)
            load.wait_for_more(40)

            def restarted() -> bool:
                replicas = {r.version: r for r in client.deployments.get("web").replicas}
                again = replicas.get(1)
                return bool(again and again.restarts == 1 and again.state is ReplicaState.READY)

            wait_for(restarted, timeout=60, what="the killed replica to be restarted")
            load.wait_for_more(20)
        assert load.failures == [], load.failures[:5]
        assert load.ok["1"] > 0 and load.ok["2"] > 0
        after = {r.version: r for r in client.deployments.get("web").replicas}
    assert after[1].id == victim.id and after[1].pid != victim.pid
    assert not launcher.is_alive(victim.pid, None)
    assert after[2].restarts == 0 and after[2].pid == before[2].pid


# --- the fast path and its token cache ----------------------------------------------------------


def _infer(url: str, secret: str, path: str = "/v2/models/web/infer") -> httpx.Response:
    body = request_body(np.zeros((1, 64), dtype=np.float32))
    return httpx.post(f"{url}{path}", json=body, headers={"Authorization": f"Bearer {secret}"})


def test_a_revoked_token_is_refused_at_once_though_it_was_just_verified(
    server: ThreadServer,
) -> None:
    token, secret = create_token(server.ctx, name="short-lived", project="default", role="viewer")
    assert _infer(server.url, secret).status_code == 200
    assert verified_principal(server.ctx, secret=secret) is not None  # remembered: fast path
    assert _infer(server.url, secret).status_code == 200
    admin = {"Authorization": f"Bearer {server.admin_token}"}
    revoked = httpx.delete(f"{server.url}/api/v1/tokens/{token.id}", headers=admin)
    assert revoked.status_code == 200, revoked.text
    assert verified_principal(server.ctx, secret=secret) is None
    refused = _infer(server.url, secret)
    assert refused.status_code == 401 and "was revoked" in refused.json()["message"]


def test_losing_a_membership_ends_access_through_the_gateway_at_once(
    server: ThreadServer,
) -> None:
    create_principal(server.ctx, name="svc-web", kind="service")
    set_member(server.ctx, project="default", principal="svc-web", role="viewer")
    _, secret = create_token(server.ctx, name="svc", principal="svc-web")
    assert _infer(server.url, secret).status_code == 200
    assert _infer(server.url, secret, "/projects/default/v2/models/web/infer").status_code == 200
    remove_member(server.ctx, project="default", principal="svc-web")
    gone = _infer(server.url, secret)
    assert gone.status_code == 404 and gone.json()["field"] == "project"


def test_a_change_made_outside_this_process_counts_within_the_ttl(
    server: ThreadServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokens, "VERIFIED_TTL_S", 0.5)
    token, secret = create_token(server.ctx, name="elsewhere", project="default", role="viewer")
    assert _infer(server.url, secret).status_code == 200
    with server.ctx.db.transaction() as s:  # as another process would: no hook runs here
        s.execute(update(TokenRow).where(TokenRow.id == token.id).values(revoked_at=utcnow()))
    wait_for(
        lambda: _infer(server.url, secret).status_code == 401,
        timeout=10,
        what="the revoked token to be refused once its verification expired",
    )


def test_the_token_cache_keys_on_the_hash_and_is_emptied_by_forget(ctx: Context) -> None:
    _, secret = create_token(ctx, name="cached")
    assert verified_principal(ctx, secret=secret) is None  # only after authenticate accepted it
    principal = authenticate(ctx, secret=secret)
    assert verified_principal(ctx, secret=secret) == principal
    assert all(secret not in key for key in tokens._verified)  # the secret is never a key
    assert verified_principal(ctx, secret=secret + "x") is None
    forget_verified()
    assert verified_principal(ctx, secret=secret) is None


def test_the_fast_path_is_counted_and_keeps_the_request_id(server: ThreadServer) -> None:
    auth = {"Authorization": f"Bearer {server.reader_token}", "X-Request-Id": "fast-1"}
    body = request_body(np.zeros((1, 64), dtype=np.float32))
    with httpx.Client(headers=auth) as client:
        for _ in range(3):
            r = client.post(f"{server.url}/v2/models/web/infer", json=body)
            assert r.status_code == 200 and r.headers["x-request-id"] == "fast-1"
        ready = client.get(f"{server.url}/projects/default/v2/models/web/ready")
        assert ready.status_code == 200 and ready.headers["x-shipyard-model-version"]
        stopped = client.post(f"{server.url}/v2/models/web%2Finfer", json=body)
        assert stopped.status_code == 400  # the path guard still sees every request
        scraped = client.get(f"{server.url}/metrics").text
    assert 'route="/v2/models/{name}/infer"' in scraped
    assert 'route="/projects/{project}/v2/models/{name}/ready"' in scraped


def test_the_gateway_reuses_its_connections_to_replicas(server: ThreadServer) -> None:
    pool = server.app.state.gateway.pool
    body = request_body(np.zeros((1, 64), dtype=np.float32))
    auth = {"Authorization": f"Bearer {server.reader_token}"}
    with httpx.Client(headers=auth) as client:
        client.post(f"{server.url}/v2/models/web/infer", json=body)  # both replicas warm
        client.post(f"{server.url}/v2/models/web/infer", json=body)
        before = pool.opened
        for _ in range(20):
            assert client.post(f"{server.url}/v2/models/web/infer", json=body).status_code == 200
    assert pool.opened == before  # one request at a time: the same keep-alive connections


# --- the pool, against small servers that misbehave on purpose ----------------------------------

_OK = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def _serving(handle: Handler) -> AsyncIterator[str]:
    """A server on 127.0.0.1 running ``handle`` per connection; its base URL. Every connection
    is closed and every handler finished on exit (nothing is left for the collector)."""
    tasks: set[asyncio.Task[None]] = set()

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                await handle(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(run, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()
        for task in tasks:  # a failed test may have left a client connected
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
         if line.startswith(b"content-length:")), 0,
    )  # fmt: skip
    return head + await reader.readexactly(length)


def test_the_pool_sends_whole_requests_and_reuses_connections() -> None:
    seen: list[bytes] = []

    async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            seen.append(await _read_request(reader))
            writer.write(_OK)

    async def main() -> None:
        async with _serving(keep_alive) as url:
            pool = Pool()
            for i in range(5):
                answer = await pool.request(
                    url, "POST", "/v2/models/m/infer", headers=[(b"x-request-id", b"r%d" % i)],
                    body=b'{"inputs": []}',
                )  # fmt: skip
                assert answer.status == 200 and answer.body == b"ok"
                assert (b"content-type", b"text/plain") in answer.headers
            assert pool.opened == 1 and pool.connection_count(url) == 1
            pool.close()
            pipelining = Pool(max_pipeline=8)
            await pipelining.request(url, "GET", "/v2/models/m", headers=[])  # one connection
            together = await asyncio.gather(
                *(pipelining.request(url, "GET", f"/v2/models/m{i}", headers=[]) for i in range(8))
            )  # sent in one turn of the loop: one write, pipelined on one connection
            assert [a.body for a in together] == [b"ok"] * 8
            assert pipelining.opened == 1
            pipelining.close()

    asyncio.run(main())
    assert len(seen) == 14
    assert seen[0].startswith(b"POST /v2/models/m/infer HTTP/1.1\r\n")
    assert b"x-request-id: r0\r\n" in seen[0] and seen[0].endswith(b'{"inputs": []}')
    assert [r.split(b" ")[1] for r in seen[6:]] == [b"/v2/models/m%d" % i for i in range(8)]


def test_the_pool_says_what_went_wrong() -> None:
    async def no_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)  # and close: a replica that died with the request

    async def half_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(_OK[:-1])

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await reader.read()  # no answer, until the client gives up

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await reader.read()

    async def main() -> None:
        pool = Pool(timeout_s=0.3)
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            closed_port = unused.getsockname()[1]
        with pytest.raises(ConnectFailed):
            await pool.request(f"http://127.0.0.1:{closed_port}", "GET", "/", headers=[])
        with pytest.raises(ConnectFailed, match="not an http://host:port URL"):
            await pool.request("https://127.0.0.1:1", "GET", "/", headers=[])
        for handle, error, says in (
            (no_answer, Dropped, "no answer came"),
            (half_answer, Dropped, "before the whole answer"),
            (slow, ReadTimeout, "no answer within 0.3s"),
            (garbage, Dropped, "not valid HTTP"),
        ):
            async with _serving(handle) as url:
                with pytest.raises(error, match=says):
                    await pool.request(url, "POST", "/x", headers=[], body=b"{}")
                assert pool.connection_count(url) == 0  # a broken connection is never reused
        pool.close()

    asyncio.run(main())


def test_a_keep_alive_connection_closed_by_the_replica_is_replaced_transparently() -> None:
    async def one_per_connection(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await _read_request(reader)
        writer.write(_OK)  # says keep-alive...
        await writer.drain()
        await _read_request(reader)  # ...but takes the next request and closes unanswered

    async def main() -> None:
        async with _serving(one_per_connection) as url:
            pool = Pool()
            for _ in range(3):
                answer = await pool.request(url, "POST", "/x", headers=[], body=b"{}")
                assert answer.status == 200
            assert pool.opened == 3  # each stale connection was replaced, no request failed
            pool.close()

    asyncio.run(main())


def test_a_job_token_is_forgotten_once_its_revocation_commits(ctx: Context) -> None:
    with ctx.db.transaction() as s:
        project_id(s, "default", create=True)
    secret = issue_job_token(ctx, job_id="job-1", project="default", run_id=None)
    authenticate(ctx, secret=secret)
    assert verified_principal(ctx, secret=secret) is not None
    with ctx.db.transaction() as s:
        revoke_job_tokens_in(s, actor="test", job_ids=["job-1"])
        assert verified_principal(ctx, secret=secret) is not None  # not committed yet
    assert verified_principal(ctx, secret=secret) is None
