"""What the audit log covers beyond the services' own events, and how it is checked from outside:
failed authentication (rate-limited), blob uploads, params and tags from ``log-batch``,
``GET /api/v1/audit/verify`` and ``shipyard audit verify|list``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import delete, select
from typer.testing import CliRunner

from shipyard.blobs import hash_bytes
from shipyard.cli.main import app
from shipyard.compute.sandbox import LaunchedJob, job_env
from shipyard.context import Context
from shipyard.domain.models import AuditEvent, MetricPoint
from shipyard.domain.principals import Principal, PrincipalKind, Role
from shipyard.errors import PermissionDeniedError
from shipyard.security import audit
from shipyard.store.tables import AuditEventRow
from shipyard.tracking import runs
from tests.server.conftest import TestClient, make_client  # noqa: F401 - the fixture

API = "/api/v1"


def events(ctx: Context, action: str | None = None) -> list[AuditEvent]:
    found = audit.list_audit_events(ctx, limit=10_000)
    return [e for e in found if action is None or e.action == action]


def verified(ctx: Context, **kwargs: float) -> bool:
    return audit.verify_audit_chain(ctx, **kwargs).ok


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """A fresh limiter on a clock the test moves (no sleeping through a minute)."""
    fake = Clock()
    monkeypatch.setattr(audit, "_auth_limiter", audit._AuthLimiter(clock=fake))
    return fake


def test_failed_authentication_is_recorded_and_rate_limited(ctx: Context, clock: Clock) -> None:
    per = audit.AUTH_FAILURES_PER_CLIENT
    for _ in range(per + 15):
        audit.record_auth_failure(ctx, reason="unknown token sy_abc...", client="10.0.0.1")
    audit.record_auth_failure(ctx, reason="x" * 1000, client="10.0.0.2")  # counted on its own
    failed = events(ctx, "auth.fail")
    assert [e.resource for e in failed].count("client/10.0.0.1") == per
    assert failed[0].actor == "anonymous" and failed[0].details["reason"].startswith("unknown")
    assert len(failed[-1].details["reason"]) == audit.MAX_REASON
    assert all("suppressed" not in e.details for e in failed)

    clock.now += audit.AUTH_WINDOW_S  # the next window: the count of what was left out comes first
    audit.record_auth_failure(ctx, reason="unknown token", client="10.0.0.1")
    last = events(ctx, "auth.fail")[-1]
    assert last.details["suppressed"] == 15 and last.details["client"] == "10.0.0.1"
    assert verified(ctx)


def test_a_flood_from_many_clients_is_capped_in_all(ctx: Context, clock: Clock) -> None:
    for n in range(audit.AUTH_FAILURES_PER_WINDOW + 50):
        audit.record_auth_failure(ctx, reason="no token", client=f"10.1.{n // 250}.{n % 250}")
    assert len(events(ctx, "auth.fail")) == audit.AUTH_FAILURES_PER_WINDOW


def test_the_server_audits_refused_tokens(
    make_client: Callable[..., TestClient],  # noqa: F811
    ctx: Context,
    clock: Clock,
) -> None:
    client = make_client(auth=True, token="sy_not-a-real-token")
    answers = [client.get(f"{API}/projects").status_code for _ in range(30)]
    assert set(answers) == {401}  # a refusal stays a refusal
    failed = events(ctx, "auth.fail")
    assert 1 <= len(failed) <= audit.AUTH_FAILURES_PER_CLIENT
    assert "sy_not-a-real-token" not in json.dumps([e.details for e in failed])


def test_a_blob_upload_is_audited(
    make_client: Callable[..., TestClient],  # noqa: F811
    ctx: Context,
) -> None:
    client = make_client()
    data = b"some bytes to keep" * 100
    digest = hash_bytes(data)
    url = f"{API}/projects/default/blobs/{digest}"
    assert client.put(url, content=data).status_code == 201
    assert client.put(url, content=data).status_code == 200
    bad = client.put(f"{API}/projects/default/blobs/{hash_bytes(b'other')}", content=data)
    assert bad.status_code == 400  # refused: nothing stored, nothing audited
    uploads = events(ctx, "blob.upload")
    assert [e.details for e in uploads] == [
        {"size": len(data), "created": True},
        {"size": len(data), "created": False},
    ]
    assert uploads[0].resource == f"project/default/blob/{digest}" and uploads[0].actor == "local"
    assert verified(ctx)


def test_log_batch_audits_params_and_tags_that_change(ctx: Context) -> None:
    run = runs.create_run(ctx, project="default", params={"seed": 1}, tags={"stage": "a"})
    before = len(events(ctx))
    runs.log_batch(ctx, run_id=run.id, params={"lr": 0.1}, tags={"stage": "b", "team": "x"})
    runs.log_batch(ctx, run_id=run.id, params={"lr": 0.1, "seed": 1}, tags={"stage": "b"})
    runs.log_batch(ctx, run_id=run.id, metrics=[MetricPoint(key="loss", value=1.0, timestamp=1.0)])
    logged = events(ctx)[before:]
    assert [(e.action, e.details) for e in logged] == [
        ("run.log", {"params": {"lr": "0.1"}, "tags": {"stage": "b", "team": "x"}})
    ], "repeating known values or logging only metrics writes no event"
    assert logged[0].resource == f"project/default/run/{run.id}"
    with pytest.raises(Exception, match="param 'lr' is already"):
        runs.log_batch(ctx, run_id=run.id, params={"lr": 0.2})
    assert len(events(ctx)) == before + 1  # a refused batch leaves no event
    assert verified(ctx)


def test_verify_over_rest_names_the_first_bad_seq(
    make_client: Callable[..., TestClient],  # noqa: F811
    ctx: Context,
) -> None:
    client = make_client()
    for n in range(4):
        audit.record_event(ctx, action="test.write", resource=f"test/{n}")
    answer = client.get(f"{API}/audit/verify")
    assert answer.status_code == 200, answer.text
    assert answer.json()["ok"] is True and answer.json()["events"] == 4
    seqs = [e.seq for e in events(ctx)]
    with ctx.db.transaction() as s:
        s.execute(delete(AuditEventRow).where(AuditEventRow.seq > seqs[1]))
    body = client.get(f"{API}/audit/verify").json()
    assert body["ok"] is False and body["first_bad_seq"] == seqs[2], body
    assert body["head_seq"] == seqs[-1]
    assert client.get(f"{API}/audit", params={"after": 2**63}).status_code == 422


def shipyard(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SHIPYARD_HOME": str(home), "COLUMNS": "250"}
    env.pop("SHIPYARD_URL", None)
    env.pop("SHIPYARD_AUDIT_KEY_FILE", None)
    return subprocess.run(
        [sys.executable, "-m", "shipyard.cli", "audit", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_cli_lists_and_verifies(ctx: Context, home: Path, home_env: Path) -> None:
    for n in range(5):
        audit.record_event(ctx, action="test.write", resource=f"test/{n}", details={"n": n})
    seqs = [e.seq for e in events(ctx)]
    cli = CliRunner()

    ok = cli.invoke(app, ["audit", "verify"])
    assert ok.exit_code == 0, ok.output
    assert "audit chain ok: 5 events" in ok.output

    listed = cli.invoke(app, ["audit", "list", "--after", str(seqs[1]), "--limit", "2"])
    assert listed.exit_code == 0, listed.output
    assert "test/2" in listed.output and "test/3" in listed.output
    assert "test/1" not in listed.output and "test/4" not in listed.output
    bad = cli.invoke(app, ["audit", "list", "--limit", "0"])
    assert bad.exit_code == 2 and "--limit" in bad.output

    with ctx.db.transaction() as s:  # edit one event and recompute the rest, without the key
        rows = s.scalars(select(AuditEventRow).order_by(AuditEventRow.seq)).all()
        for row in rows:
            row.hash = f"tmp{row.seq}"
        s.flush()
        prev = audit.GENESIS
        for row in rows:
            if row.seq == seqs[3]:
                row.details = {"n": 99}
            row.prev_hash = prev
            row.hash = prev = audit._hash(
                prev, row.at, row.actor, row.action, row.resource, row.details
            )
    broken = shipyard(home, "verify")
    assert broken.returncode == 1
    lines = broken.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error [audit]:"), broken.stderr
    assert f"broken at event {seqs[0]}" in lines[0]  # the first recomputed one fails its HMAC
    assert "Traceback" not in broken.stderr


def test_the_cli_reports_a_truncated_chain(ctx: Context, home: Path) -> None:
    for n in range(3):
        audit.record_event(ctx, action="test.write", resource=f"test/{n}")
    with ctx.db.transaction() as s:
        s.execute(delete(AuditEventRow))
    broken = shipyard(home, "verify")
    assert broken.returncode == 1
    assert broken.stderr.startswith("error [audit]: the audit chain is broken at event 1: missing")


def test_only_server_admins_read_or_verify_the_log(ctx: Context) -> None:
    audit.record_event(ctx, action="test.write", resource="test/0")
    alice = ctx.as_principal(
        Principal(id="u1", name="alice", kind=PrincipalKind.USER, roles={"default": Role.ADMIN})
    )
    with pytest.raises(PermissionDeniedError, match="server admins only"):
        audit.verify_audit_chain(alice)
    with pytest.raises(PermissionDeniedError, match="server admins only"):
        audit.list_audit_events(alice)
    assert verified(ctx) and len(events(ctx)) == 1


def test_a_job_a_server_launches_gets_neither_the_key_nor_where_it_is(ctx: Context) -> None:
    audit.record_event(ctx, action="test.write", resource="test/0")  # the key exists now
    key = json.loads(ctx.settings.audit_key_path.read_text())["key"]
    parent = {
        "PATH": "/usr/bin",
        "SHIPYARD_HOME": str(ctx.settings.home),
        "SHIPYARD_AUDIT_KEY_FILE": str(ctx.settings.audit_key_path),
        "SHIPYARD_AUDIT_HEAD_FILE": str(ctx.settings.audit_head_path),
    }
    env = job_env(
        LaunchedJob(job_id="j1", project="default", run_id=None, gpus=[]),
        {},
        shipyard_url="http://127.0.0.1:1",
        token="sy_job",
        settings=ctx.settings,
        parent_env=parent,
    )
    assert not any(k.startswith("SHIPYARD_AUDIT") for k in env)
    assert all(key not in v and "keys" not in v for v in env.values()), env
