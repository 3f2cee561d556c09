"""``make test``'s set-up step: it installs the Debian packages the suite needs when it can, and
otherwise names each test group that will skip, why, and the command that fixes it."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "system-packages.sh"


def _run(env: dict[str, str], *, user: str | None = None) -> subprocess.CompletedProcess[str]:
    command = ["bash", str(SCRIPT)]
    if user is not None:
        command = ["su", user, "-s", "/bin/bash", "-c", f"bash {SCRIPT}"]
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("su") is None, reason="needs root and su")
def test_without_root_it_names_what_skips_and_how_to_install(tmp_path: Path) -> None:
    pwd.getpwnam("nobody")
    # an empty root: neither PostgreSQL nor chromium is "installed" there, and no PATH fallback
    env = {"PATH": "/usr/bin:/bin", "SYSTEM_PACKAGES_ROOT": str(tmp_path)}
    result = _run(env | {"SHELL": "/bin/bash"}, user="nobody")
    # su resets the environment's PATH but keeps the variable the script reads
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert "postgresql is missing" in err and "the PostgreSQL store tests will SKIP" in err
    assert "chromium is missing" in err and "browser tests of the web page will SKIP" in err
    assert "not root and has no passwordless sudo" in err
    assert "sudo apt-get install postgresql" in err
    assert "sudo apt-get install chromium fonts-liberation" in err
    assert "prometheus is missing" in err and "sudo apt-get install prometheus" in err


def test_with_everything_installed_it_is_silent(tmp_path: Path) -> None:
    for sub in ("usr/lib/postgresql/15/bin", "usr/bin"):
        (tmp_path / sub).mkdir(parents=True)
    for exe in (
        "usr/lib/postgresql/15/bin/initdb",
        "usr/lib/postgresql/15/bin/pg_ctl",
        "usr/lib/postgresql/15/bin/postgres",
        "usr/bin/chromium",
        "usr/bin/promtool",
        "usr/bin/prometheus",
    ):
        (tmp_path / exe).write_text("#!/bin/sh\n")
        (tmp_path / exe).chmod(0o755)
    result = _run({"PATH": "/usr/bin:/bin", "SYSTEM_PACKAGES_ROOT": str(tmp_path)})
    assert result.returncode == 0
    assert result.stdout == "" and result.stderr == ""


def test_ci_run_only_calls_make_test() -> None:
    text = (REPO / ".ci" / "run").read_text()
    assert "make test" in text
    assert "apt-get" not in text  # the install lives in make test's set-up step, not in CI only
    makefile = (REPO / "Makefile").read_text()
    assert "scripts/system-packages.sh" in makefile
