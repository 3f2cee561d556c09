"""Access management as an operator does it: ``shipyard users|projects|members|token`` on the
server host's home, then what the server (auth on, a real process) lets each token do."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update
from typer.testing import CliRunner

from shipyard.cli import main as cli_main
from shipyard.context import Context
from shipyard.security import principals, tokens
from shipyard.settings import Settings
from shipyard.store.engine import forget_database
from shipyard.store.tables import TokenRow, utcnow
from tests.conftest import LiveServer

API = "/api/v1"
NOT_SHOWN = "never"


def shipyard(
    home: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``shipyard ARGS`` as a user runs it: the entry point in a subprocess, on ``home``."""
    full = {**os.environ, "SHIPYARD_HOME": str(home), "COLUMNS": "250"}
    for key in ("SHIPYARD_URL", "SHIPYARD_TOKEN", "SHIPYARD_PROJECT"):
        full.pop(key, None)
    full.update(env or {})
    if not full["COLUMNS"]:
        del full["COLUMNS"]
    return subprocess.run(
        [sys.executable, "-m", "shipyard.cli", *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


class Cli:
    """``shipyard ARGS`` through the CLI's own entry point (``main``: parsing, the commands, the
    one-line errors and exit codes) in this process - a subprocess costs seconds of imports -
    with ``real=True`` in a subprocess."""

    def __init__(
        self, home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        self.home, self.monkeypatch, self.capsys = home, monkeypatch, capsys
        monkeypatch.setenv("SHIPYARD_HOME", str(home))
        for key in ("SHIPYARD_URL", "SHIPYARD_TOKEN", "SHIPYARD_PROJECT"):
            monkeypatch.delenv(key, raising=False)
        # what COLUMNS=250 gives a process (the console reads COLUMNS when it is made)
        monkeypatch.setattr(cli_main.console, "_width", 250)

    def __call__(self, *args: str, real: bool = False) -> subprocess.CompletedProcess[str]:
        if real:
            return shipyard(self.home, *args)
        self.capsys.readouterr()
        with self.monkeypatch.context() as patch:
            patch.setattr(sys, "argv", ["shipyard", *args])
            with pytest.raises(SystemExit) as exited:
                cli_main.main()
        out = self.capsys.readouterr()
        code = exited.value.code
        return subprocess.CompletedProcess(
            args, code if isinstance(code, int) else 1, out.out, out.err
        )

    def ok(self, *args: str, real: bool = False) -> str:
        out = self(*args, real=real)
        assert out.returncode == 0, (args, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr
        return out.stdout

    def secret(self, *args: str, real: bool = False) -> str:
        out = self("token", "create", *args, real=real)
        assert out.returncode == 0, (args, out.stderr)
        assert "will not be shown again" in out.stderr
        secret = out.stdout.strip()
        assert secret.startswith(tokens.TOKEN_PREFIX), out.stdout
        return secret

    def tokens(self, *args: str, real: bool = False) -> dict[str, dict[str, str]]:
        """``shipyard token list``, by token name: column -> text."""
        out = self.ok("token", "list", *args, real=real)
        header = [c.strip() for c in out.splitlines()[1].strip().strip("┃").split("┃")]
        assert header == [
            "id",
            "name",
            "prefix",
            "user",
            "project",
            "role",
            "expires",
            "last used",
            "revoked",
        ], out
        return {row[1]: dict(zip(header, row, strict=True)) for row in table(out)}


@pytest.fixture
def cli(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Cli]:
    yield Cli(home, monkeypatch, capsys)
    forget_database(Settings(home=home).database_url)


def table(stdout: str) -> list[list[str]]:
    """The body rows of a rich table, as lists of cell texts."""
    return [
        [cell.strip() for cell in line.strip().strip("│").split("│")]
        for line in stdout.splitlines()
        if line.startswith("│")
    ]


def one_error_line(out: subprocess.CompletedProcess[str], field: str, *words: str) -> str:
    assert out.returncode == 1, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"error [{field}]: "), out.stderr
    for word in words:
        assert word in lines[0], (word, out.stderr)
    return lines[0]


class Api:
    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=30)

    def __call__(self, method: str, path: str, secret: str, **kwargs: object) -> httpx.Response:
        headers = {"Authorization": f"Bearer {secret}"}
        return self.http.request(method, API + path, headers=headers, **kwargs)  # type: ignore[arg-type]

    def status(self, method: str, path: str, secret: str, **kwargs: object) -> int:
        return self(method, path, secret, **kwargs).status_code


def _snapshot(ctx: Context) -> list[list[Any]]:
    """Users, tokens, projects and members, as the services read them."""
    projects = principals.list_projects(ctx)
    members = [m for p in projects for m in principals.list_members(ctx, project=p.name)]
    return [principals.list_principals(ctx), tokens.list_tokens(ctx), projects, members]


def _expire(ctx: Context, token_id: str) -> None:
    """Time passes: the token's expiry is now behind us."""
    with ctx.db.transaction() as s:
        s.execute(
            update(TokenRow)
            .where(TokenRow.id == token_id)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )


@pytest.mark.slow
def test_users_projects_members_and_tokens_take_effect_on_the_server(
    cli: Cli, home: Path, ctx: Context
) -> None:
    assert cli.ok("users", "create", "alice").strip() == "user alice created"
    cli.ok("users", "create", "bob")
    assert cli.ok("users", "create", "ci", "--service").strip() == "service ci created"
    cli.ok("projects", "create", "alpha")
    cli.ok("projects", "create", "beta")
    assert cli.ok("members", "add", "alpha", "alice", "--role", "editor").strip() == (
        "alice is editor of alpha"
    )
    cli.ok("members", "add", "beta", "alice", "--role", "viewer")
    assert cli.ok("members", "add", "alpha", "bob").strip() == "bob is viewer of alpha"
    assert cli.ok("projects", "list").split() == ["alpha", "beta", "default"]
    assert table(cli.ok("members", "list", "alpha")) == [
        ["alice", "user", "editor"],
        ["bob", "user", "viewer"],
    ]

    # no --user, on the server host: a token of the server admin 'admin' (a real process)
    ops = cli.secret("ops", real=True)
    alice = cli.secret("alice-all", "--user", "alice")
    narrow = cli.secret("alice-view", "--user", "alice", "--project", "alpha", "--role", "viewer")
    soon = cli.secret("alice-soon", "--user", "alice", "--expires", "1m")
    # a token narrows, never widens: admin in beta, where alice is a viewer
    wide = cli.secret("alice-wide", "--user", "alice", "--project", "beta", "--role", "admin")
    bob = cli.secret("bob", "--user", "bob")

    listed = cli.tokens()
    assert set(listed) == {"ops", "alice-all", "alice-view", "alice-soon", "alice-wide", "bob"}
    assert (listed["ops"]["user"], listed["ops"]["project"], listed["ops"]["role"]) == (
        "admin",
        "*",
        "*",
    )
    assert (listed["alice-view"]["user"], listed["alice-view"]["project"]) == ("alice", "alpha")
    assert listed["alice-view"]["role"] == "viewer"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", listed["alice-soon"]["expires"])
    assert all(listed[n]["expires"] == NOT_SHOWN for n in ("ops", "alice-all", "bob"))
    assert all(row["last used"] == NOT_SHOWN for row in listed.values())

    server = LiveServer(home, auth=True)
    api = Api(server.url)
    try:
        # the server admin: everything
        assert api.status("GET", "/users", ops) == 200
        assert api.status("POST", "/projects/beta/runs", ops, json={"name": "r"}) == 201
        # alice, unnarrowed: editor of alpha, viewer of beta
        assert api.status("POST", "/projects/alpha/runs", alice, json={"name": "r"}) == 201
        assert api.status("GET", "/projects/beta/runs", alice) == 200
        denied = api("POST", "/projects/beta/runs", alice, json={"name": "r"})
        assert denied.status_code == 403, denied.text
        assert denied.json()["code"] == "permission_denied"
        assert "editor" in denied.json()["message"] and "'beta'" in denied.json()["message"]
        assert api.status("GET", "/users", alice) == 403
        # narrowed to alpha as viewer: it reads alpha, writes nothing, and beta is not there
        assert api.status("GET", "/projects/alpha/runs", narrow) == 200
        assert api.status("POST", "/projects/alpha/runs", narrow, json={"name": "r"}) == 403
        hidden = api("GET", "/projects/beta/runs", narrow)
        assert hidden.status_code == 404
        assert hidden.json()["message"] == "project 'beta' does not exist"
        assert [p["name"] for p in api("GET", "/projects", narrow).json()] == ["alpha"]
        # bob views alpha only and cannot tell beta from a project that does not exist
        assert api.status("GET", "/projects/alpha/runs", bob) == 200
        assert api.status("POST", "/projects/alpha/runs", bob, json={"name": "r"}) == 403
        assert api("GET", "/projects/beta/runs", bob).json() == {
            **api("GET", "/projects/nosuch/runs", bob).json(),
            "message": "project 'beta' does not exist",
        }
        assert api.status("GET", "/projects/alpha/runs", soon) == 200
        assert api.status("GET", "/projects/beta/runs", wide) == 200
        assert api.status("POST", "/projects/beta/runs", wide, json={"name": "r"}) == 403
        assert api.status("GET", "/projects/alpha/runs", wide) == 404

        # last use is noted, and 'token list' (a real process) shows it with the rest
        listed = cli.tokens(real=True)
        for used in ("ops", "alice-all", "alice-view", "alice-soon", "bob"):
            assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", listed[used]["last used"])
        assert listed["alice-view"]["project"] == "alpha" and listed["bob"]["user"] == "bob"
        assert set(cli.tokens("--user", "alice")) == {
            "alice-all",
            "alice-view",
            "alice-soon",
            "alice-wide",
        }

        # revoked: 401 at once, naming where to look
        revoked = cli.ok("token", "revoke", listed["alice-view"]["id"])
        assert revoked.strip() == f"token alice-view ({listed['alice-view']['prefix']}) revoked"
        gone = api("GET", "/projects/alpha/runs", narrow)
        assert gone.status_code == 401
        assert gone.json()["code"] == "unauthenticated"
        assert "revoked" in gone.json()["message"]
        assert "shipyard token list" in gone.json()["message"]
        assert api.status("GET", "/projects/alpha/runs", alice) == 200  # her other token works

        # expired: likewise
        _expire(ctx, listed["alice-soon"]["id"])
        late = api("GET", "/projects/alpha/runs", soon)
        assert late.status_code == 401
        assert "expired" in late.json()["message"]
        assert "shipyard token list" in late.json()["message"]

        # membership changes take effect on the next request
        assert cli.ok("members", "remove", "alpha", "bob").strip() == "bob removed from alpha"
        assert api("GET", "/projects/alpha/runs", bob).json()["message"] == (
            "project 'alpha' does not exist"
        )
        cli.ok("members", "add", "beta", "alice", "--role", "editor")
        assert api.status("POST", "/projects/beta/runs", alice, json={"name": "r"}) == 201

        # a disabled user's tokens stop working
        assert cli.ok("users", "disable", "alice").strip() == "alice disabled"
        off = api("GET", "/projects/alpha/runs", alice)
        assert off.status_code == 401 and "shipyard token list" in off.json()["message"]
        assert table(cli.ok("users", "list")) == [
            ["admin", "user", "yes", ""],  # made by the first 'token create' without --user
            ["alice", "user", "", "yes"],
            ["bob", "user", "", ""],
            ["ci", "service", "", ""],
        ]
        final = cli.tokens()
        assert [n for n, row in final.items() if row["revoked"]] == ["alice-view"]
    finally:
        api.http.close()
        server.stop()


BAD_INPUTS: list[tuple[Any, ...]] = [
    (("token", "create", "t", "--user", "nobody"), "principal", "'nobody'", "users list"),
    (("token", "create", "t", "--expires", "5 parsecs"), "expires", "'5 parsecs'", "30d"),
    (("token", "create", "t", "--role", "god"), "role", "'god'", "viewer, editor, admin"),
    (("token", "create", "t", "--expires", "0d"), "expires", "'0d'"),
    (("token", "create", "t", "--user", "alice", "--project", "nosuch"), "project", "nosuch"),
    (("token", "create", "../t"), "name", "../t"),
    (("token", "list", "--user", "nobody"), "principal", "'nobody'"),
    (("token", "revoke", "nosuch"), "token_id", "'nosuch'", "shipyard token list"),
    (("members", "add", "alpha", "nobody"), "principal", "'nobody'"),
    (("members", "add", "alpha", "alice", "--role", "owner"), "role", "'owner'"),
    (("members", "add", "nosuch", "alice"), "project", "'nosuch'"),
    (("members", "remove", "alpha", "nobody"), "principal", "'nobody'"),
    (("members", "list", "nosuch"), "project", "'nosuch'"),
    (("users", "create", "alice"), "name", "'alice'"),
    (("users", "create", "job-1"), "name", "job-"),
    (("users", "disable", "nobody"), "principal", "'nobody'"),
    (("projects", "create", "alpha"), "name", "'alpha'"),
    (("projects", "create", "a/b"), "name"),
]


def test_bad_inputs_are_one_error_line_exit_1_and_store_nothing(
    cli: Cli, ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    principals.create_principal(ctx, name="alice")
    principals.create_project(ctx, name="alpha")
    principals.set_member(ctx, project="alpha", principal="alice", role="editor")
    tokens.create_token(ctx, name="first", principal="alice")
    before = _snapshot(ctx)
    for args, field, *words in BAD_INPUTS:
        one_error_line(cli(*args), field, *words)
    monkeypatch.setenv("SHIPYARD_URL", "http://127.0.0.1:9")
    one_error_line(cli("users", "list"), "SHIPYARD_URL", "server host")
    assert _snapshot(ctx) == before


@pytest.mark.slow
def test_a_real_process_prints_one_error_line_even_when_piped_narrow(home: Path) -> None:
    """No COLUMNS and stderr a pipe: rich would wrap at 80 columns; the error stays one line."""
    for args, field, *words in BAD_INPUTS[:2]:
        out = shipyard(home, *args, env={"COLUMNS": ""})
        assert len(out.stderr.strip()) > 80, out.stderr  # long enough to have wrapped
        one_error_line(out, field, *words)


def test_token_create_refuses_an_owner_whose_token_could_not_work(cli: Cli) -> None:
    """Without --user the host's token belongs to the server admin 'admin'; a plain user of
    that name, or a disabled owner, would get a token that never does what it is made for."""
    cli.ok("users", "create", "admin")  # a plain user, not a server admin
    cli.ok("users", "create", "alice")
    one_error_line(cli("token", "create", "ops"), "principal", "'admin'", "--user", "--admin")
    assert cli.secret("ops", "--user", "alice").startswith(tokens.TOKEN_PREFIX)
    cli.ok("users", "disable", "alice")
    one_error_line(cli("token", "create", "t", "--user", "alice"), "principal", "disabled")
    assert list(cli.tokens()) == ["ops"]


def test_a_job_principal_cannot_be_made_a_member(cli: Cli, ctx: Context) -> None:
    principals.create_project(ctx, name="alpha")
    principals.create_project(ctx, name="beta")
    principals.issue_job_token(ctx, job_id="abc", project="alpha", run_id=None)
    before = _snapshot(ctx)
    for project in ("alpha", "beta"):
        out = cli("members", "add", project, "job-abc", "--role", "admin")
        one_error_line(out, "principal", "'job-abc'", "job")
    assert _snapshot(ctx) == before
    assert table(cli.ok("members", "list", "alpha")) == [["job-abc", "job", "viewer"]]


ACCESS_COMMANDS = [
    ["users", "create"],
    ["users", "list"],
    ["users", "disable"],
    ["projects", "create"],
    ["projects", "list"],
    ["members", "add"],
    ["members", "remove"],
    ["members", "list"],
    ["token", "create"],
    ["token", "list"],
    ["token", "revoke"],
]


@pytest.mark.parametrize("args", ACCESS_COMMANDS, ids=" ".join)
def test_every_access_command_has_help(args: list[str]) -> None:
    result = CliRunner().invoke(cli_main.app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and "--help" in result.output
