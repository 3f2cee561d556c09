"""Noting a token's last use is bookkeeping: a full disk must not turn an authenticated read
away (it did: the per-minute ``last_used_at`` write raised "database or disk is full")."""

from __future__ import annotations

import warnings
from pathlib import Path

from shipyard.context import open_context
from shipyard.security import tokens
from shipyard.server.app import create_app
from shipyard.settings import Settings
from shipyard.store.engine import forget_database
from tests.mounts import fill, tmpfs

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient


def test_a_full_disk_does_not_refuse_an_authenticated_read(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", size_kb=6144) as disk:
        settings = Settings(home=disk / "home")
        ctx = open_context(settings, actor="tester")
        try:
            _, secret = tokens.create_token(ctx, name="ci")
            app = create_app(settings, auth=True, scheduler=False)
            with TestClient(app, headers={"Authorization": f"Bearer {secret}"}) as client:
                assert client.get("/api/v1/projects/default/runs").status_code == 200
                noted = tokens.list_tokens(ctx)[0].last_used_at
                assert noted is not None
                fill(disk)
                tokens.forget_last_used()  # a minute has passed: the next use is written
                assert tokens.authenticate(ctx, secret=secret).name == "admin"
                response = client.get("/api/v1/projects/default/runs")
                assert response.status_code == 200, response.text
                assert tokens.list_tokens(ctx)[0].last_used_at == noted  # not written, no harm
                (disk / "filler").unlink()
                tokens.forget_last_used()
                assert client.get("/api/v1/projects/default/runs").status_code == 200
                later = tokens.list_tokens(ctx)[0].last_used_at
                assert later is not None and later > noted  # written again
        finally:
            forget_database(settings.database_url)
