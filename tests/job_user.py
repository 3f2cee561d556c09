"""A Python the job user can run, for tests whose jobs a server launches.

A server running as root (as the suite does in CI) runs jobs as an unprivileged user (``nobody``
by default, ``compute.sandbox``). That user may not be able to reach this interpreter (pyenv
under a 0700 ``/root``): then the system's ``python3`` with this checkout's source and
site-packages on ``PYTHONPATH`` (same minor version, so the compiled packages load) stands in.
"""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import shipyard
from shipyard.settings import DEFAULT_JOB_USER

_PROBE = "import shipyard, httpx, pydantic; print('ok')"


@functools.cache
def job_python(user: str = DEFAULT_JOB_USER) -> tuple[str, tuple[tuple[str, str], ...]]:
    """``(interpreter, env items)`` with which a job run as ``user`` can import shipyard."""
    if os.geteuid() != 0:
        return sys.executable, ()  # jobs run as ourselves
    candidates: list[tuple[str, dict[str, str]]] = [(sys.executable, {})]
    system = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    if system is not None:
        path = os.pathsep.join(
            [str(Path(shipyard.__file__).resolve().parents[1]), sysconfig.get_paths()["purelib"]]
        )
        candidates.append((system, {"PYTHONPATH": path}))
    entry = pwd.getpwnam(user)
    for exe, env in candidates:
        try:
            result = subprocess.run(
                [exe, "-c", _PROBE],
                env={"PATH": "/usr/bin:/bin", **env},
                cwd="/",
                user=entry.pw_uid,
                group=entry.pw_gid,
                extra_groups=[],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        except OSError:
            continue
        if result.stdout.strip() == "ok":
            return exe, tuple(env.items())
    raise RuntimeError(f"no Python that user {user!r} can run imports shipyard")


def job_command(*args: str) -> tuple[list[str], dict[str, str]]:
    """``[python, *args]`` and the env a server's job needs for it."""
    exe, env = job_python()
    return [exe, *args], dict(env)
