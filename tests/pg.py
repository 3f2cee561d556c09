"""A throwaway PostgreSQL server for tests, started from the distribution's package binaries.

``PostgresServer.start()`` runs ``initdb`` into a fresh temp folder, starts ``postgres`` on
127.0.0.1 at a free port (its unix socket in the same temp folder, trust auth, durability off:
nothing here outlives the test session) and ``stop()`` removes everything again. PostgreSQL
refuses to run as root, so as root the binaries run as the ``postgres`` OS user that Debian's
``postgresql`` package creates.

``tests/conftest.py`` wraps this in the session fixture ``postgres_url``; ``create_database``
makes an extra, empty database next to it for a test that needs a clean schema.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

from sqlalchemy.engine import make_url

INSTALL_HINT = (
    "PostgreSQL's server binaries (initdb, pg_ctl, postgres) were not found under "
    "/usr/lib/postgresql/*/bin or on PATH: install the `postgresql` package "
    "(Debian/Ubuntu: `apt-get install -y postgresql`; .ci/run does this)"
)
_BINARIES = ("initdb", "pg_ctl", "postgres")
_OS_USER = "postgres"


class PostgresUnavailable(RuntimeError):
    """The server binaries (or the OS user to run them as root) are not on this machine."""


def find_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/N/bin`` holding the server binaries, else PATH's."""

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", Path(path).parent.name))

    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if all(os.access(Path(candidate) / b, os.X_OK) for b in _BINARIES):
            return Path(candidate)
    found = [shutil.which(b) for b in _BINARIES]
    if all(found):
        return Path(found[0]).parent  # type: ignore[arg-type]
    return None


class PostgresServer:
    """One PostgreSQL server in a temp folder; ``start()`` then ``url()``, ``stop()`` at the end."""

    def __init__(self, *, database: str = "shipyard_test") -> None:
        self.database = database
        self.bin_dir = find_bin_dir()
        self.port: int | None = None
        self.tmp: Path | None = None
        self._as_user: list[str] = []

    def start(self) -> None:
        if self.bin_dir is None:
            raise PostgresUnavailable(INSTALL_HINT)
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(_OS_USER)
            except KeyError:
                raise PostgresUnavailable(
                    f"running as root, but there is no {_OS_USER!r} OS user to run PostgreSQL as; "
                    + INSTALL_HINT
                ) from None
            self._as_user = ["runuser", "-u", _OS_USER, "--"]
        # Not pytest's tmp_path: its parent is private to root and the server user must enter it.
        self.tmp = Path(tempfile.mkdtemp(prefix="shipyard-pg-"))
        if self._as_user:
            shutil.chown(self.tmp, user=_OS_USER)
        self._run(
            "initdb",
            "-D",
            str(self.data_dir),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        )
        last_error = ""
        for _attempt in range(5):  # a free port can be taken between probing and binding
            self.port = _free_port()
            options = " ".join(
                [
                    "-c listen_addresses=127.0.0.1",
                    f"-p {self.port}",
                    f"-k {self.tmp}",
                    "-c fsync=off",
                    "-c synchronous_commit=off",
                    "-c full_page_writes=off",
                    "-c max_connections=200",
                ]
            )
            result = self._run(
                "pg_ctl",
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
                "-w",
                "-t",
                "60",
                "-o",
                options,
                "start",
                check=False,
            )
            if result.returncode == 0:
                break
            last_error = result.stdout + result.stderr + self.log_file.read_text(errors="replace")
        else:
            self.stop()
            raise RuntimeError(f"PostgreSQL did not start:\n{last_error}")
        self._run(
            "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", self.database
        )

    def url(self, database: str | None = None) -> str:
        assert self.port is not None, "start() the server first"
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database or self.database}"

    def stop(self) -> None:
        if self.tmp is None:
            return
        if self.data_dir.joinpath("postmaster.pid").exists():
            self._run(
                "pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop", check=False
            )
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp = None

    @property
    def data_dir(self) -> Path:
        assert self.tmp is not None
        return self.tmp / "data"

    @property
    def log_file(self) -> Path:
        assert self.tmp is not None
        return self.tmp / "postgres.log"

    def _run(self, binary: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert self.bin_dir is not None and self.tmp is not None
        command = [*self._as_user, str(self.bin_dir / binary), *args]
        env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PGTZ": "UTC"}
        env.pop("PGDATA", None)
        result = subprocess.run(
            command,
            cwd=self.tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
            )
        return result


def create_database(server_url: str, name: str | None = None) -> str:
    """Create an empty database on the server behind ``server_url``; return its URL."""
    import psycopg

    name = name or f"shipyard_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_conninfo(server_url, "postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def drop_database(url: str) -> None:
    """Drop the database behind ``url`` (its connections are closed first)."""
    import psycopg

    name = make_url(url).database
    with psycopg.connect(_conninfo(url, "postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _conninfo(url: str, database: str) -> str:
    parsed = make_url(url)
    return f"host={parsed.host} port={parsed.port} user={parsed.username} dbname={database}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
