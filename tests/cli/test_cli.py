"""The CLI as a user runs it: the real ``shipyard`` entry point in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from shipyard.cli.main import app

COMMANDS = [
    [],
    ["server"],
    ["demo"],
    ["data"],
    ["data", "commit"],
    ["data", "list"],
    ["data", "show"],
    ["run"],
    ["jobs"],
    ["jobs", "list"],
    ["jobs", "show"],
    ["jobs", "logs"],
    ["jobs", "cancel"],
    ["runs", "list"],
    ["runs", "show"],
    ["models", "list"],
    ["models", "show"],
    ["models", "alias"],
    ["deploy"],
    ["endpoints", "list"],
    ["endpoints", "stop"],
    ["predict"],
    ["token", "create"],
]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a) or "root")
def test_every_command_has_help(args: list[str]) -> None:
    result = CliRunner().invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and "--help" in result.output


def shipyard(
    home: Path, *args: str, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SHIPYARD_HOME": str(home), "COLUMNS": "200"}
    env.pop("SHIPYARD_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "shipyard.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_data_commit_list_show(home: Path, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    pq.write_table(pa.table({"a": [1, 2, 3]}), folder / "t.parquet")
    out = shipyard(home, "data", "commit", str(folder), "--dataset", "tiny", "-m", "first")
    assert out.returncode == 0, out.stderr
    assert "dataset tiny v1: 1 files" in out.stdout
    listed = shipyard(home, "data", "list")
    assert "tiny" in listed.stdout and listed.returncode == 0
    shown = shipyard(home, "data", "show", "tiny@1")
    assert "t.parquet" in shown.stdout and "3 rows" in shown.stdout


def test_errors_are_one_clear_line_and_exit_1(home: Path, tmp_path: Path) -> None:
    out = shipyard(home, "data", "show", "nope")
    assert out.returncode == 1
    assert "error [name]:" in out.stderr and "nope" in out.stderr
    assert "Traceback" not in out.stderr
    bad = shipyard(home, "data", "commit", str(tmp_path), "--dataset", "../escape")
    assert bad.returncode == 1 and "not a valid name" in bad.stderr


def test_token_create_shows_secret_once_and_stores_hash(home: Path) -> None:
    out = shipyard(home, "token", "create", "ci")
    assert out.returncode == 0, out.stderr
    secret = out.stdout.strip()
    assert secret.startswith("shp_") and len(secret) > 40
    db = (home / "shipyard.db").read_bytes()
    wal = home / "shipyard.db-wal"
    assert secret.encode() not in db + (wal.read_bytes() if wal.exists() else b"")


def test_run_follows_logs_and_reports_status(home: Path, tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "hello.py").write_text(
        "import os\nprint('hello from', os.environ['SHIPYARD_JOB_ID'])\n"
    )
    out = shipyard(home, "run", "--", sys.executable, "hello.py", cwd=code)
    assert out.returncode == 0, out.stderr
    assert "hello from" in out.stdout
    assert "succeeded" in out.stderr
    failing = shipyard(home, "run", "--", sys.executable, "-c", "raise SystemExit(3)", cwd=code)
    assert failing.returncode == 1 and "failed" in failing.stderr
    missing = shipyard(home, "run", "--", "no-such-command-xyz", cwd=code)
    assert missing.returncode == 1 and "no-such-command-xyz" in missing.stderr
    jobs = shipyard(home, "jobs", "list")
    assert jobs.stdout.count("succeeded") == 1 and jobs.stdout.count("failed") == 1
