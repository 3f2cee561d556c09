"""Replica processes on this machine: spawn on a pre-bound socket, wait until ready, stop.

The parent binds ``127.0.0.1:0`` itself and hands the listening socket to the child
(``pass_fds``), so the port is known before the child starts and no other process can take it in
between. Replicas run in a session of their own (``start_new_session``) so that stopping one
signals its whole process group and a Ctrl-C in the deploying terminal does not reach it; they
outlive the process that deployed them. Their stdout and stderr go to a log file whose tail is
quoted when a start fails.

Each replica starts in an empty working directory of its own (``mkdtemp``: mode 0700), never in
the deploying process's: a relative path that something in the replica opens (a model's external
data reference, a module on ``sys.path[0]``) finds nothing there. The replica runs through this
module's entry point (``python -m shipyard.serving.launcher --workdir DIR
shipyard.serving.replica ...``), which removes the directory when the replica exits; stopping a
replica removes it too, and starting one sweeps those of replicas killed outright.

This is the local backend of serving; the deployment service (``deployments``) holds the rules.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import httpx
import psutil

from shipyard.children import Children
from shipyard.context import Context
from shipyard.domain.names import validate_name
from shipyard.errors import BackendError, InvalidInputError
from shipyard.security.paths import safe_join

LOG_NAME = "replica.log"
STOP_GRACE_S = 10.0
WORKDIR_PREFIX = "shipyard-replica-"
REPLICA_MODULE = "shipyard.serving.replica"
WORKDIR_SWEEP_AGE_S = 60.0

# Replicas started by this process (reaped, and asked directly whether they still run).
_children = Children()
_exited: dict[int, int] = {}  # exit statuses of reaped replicas, by pid (bounded)


@dataclass(frozen=True)
class ReplicaProcess:
    """A spawned replica: its pid and start time (to tell it from a reused pid), URL and log."""

    pid: int
    create_time: float
    url: str
    log_path: Path
    log_offset: int  # where this start's output begins in the (appended) log
    workdir: Path | None = None  # its private working directory (it removes it on exit)


def start_replica(
    ctx: Context,
    *,
    name: str,
    digest: str,
    version: int | str,
    project: str | None = None,
    max_batch_size: int = 32,
    max_wait_ms: float = 5.0,
    max_body_bytes: int | None = None,
    ready_timeout: float = 60.0,
) -> tuple[int, str]:
    """Spawn a replica serving blob ``digest`` as model ``name`` and wait until it is ready.

    Returns ``(pid, base_url)``. On failure the replica is stopped and BackendError says what
    failed, quotes the end of its log and says where the whole log is.
    """
    replica = spawn_replica(
        ctx,
        name=name,
        digest=digest,
        version=version,
        project=project,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        max_body_bytes=max_body_bytes,
    )
    wait_until_ready(replica, timeout=ready_timeout)
    return replica.pid, replica.url


def spawn_replica(
    ctx: Context,
    *,
    name: str,
    digest: str,
    version: int | str,
    project: str | None = None,
    max_batch_size: int = 32,
    max_wait_ms: float = 5.0,
    max_body_bytes: int | None = None,
    threads: int | None = None,
    log_name: str = LOG_NAME,
    model_name: str | None = None,
    grpc_port: int | None = None,
    grpc_max_message_bytes: int | None = None,
) -> ReplicaProcess:
    """Bind 127.0.0.1:0, start ``python -m shipyard.serving.replica --fd`` on it; do not wait.

    ``threads``: the model's intra-op threads (the replica's default when None); ``log_name``:
    the log file in the deployment's folder (one per replica slot when a deployment has several).
    ``name`` is the deployment's name (the replica's metrics carry it as ``deployment``);
    ``model_name`` the registered model's (their ``model`` label; the deployment's name when
    None). ``grpc_port`` (0: any free port) also serves gRPC; the replica prints the bound
    port in its log (``replica.GRPC_LISTENING``).
    """
    validate_name(name, field="name")
    if max_batch_size < 1 or max_batch_size > 4096:
        raise InvalidInputError("max_batch_size must be between 1 and 4096", field="max_batch_size")
    if max_wait_ms < 0 or max_wait_ms > 10_000:
        raise InvalidInputError("max_wait_ms must be between 0 and 10000", field="max_wait_ms")
    log_path = replica_log_path(ctx, name=name, project=project, log_name=log_name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    reap_exited()
    sweep_workdirs()

    # The replica starts elsewhere, so a local blob store is named by its absolute path.
    blobs_url = f"file://{ctx.blobs.root}" if ctx.blobs.is_local else ctx.blobs.url
    workdir = tempfile.mkdtemp(prefix=WORKDIR_PREFIX)  # empty, mode 0700; the child removes it
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        port = sock.getsockname()[1]
        command = [
            sys.executable, "-m", "shipyard.serving.launcher",
            "--workdir", workdir,
            REPLICA_MODULE,
            "--blobs", blobs_url,
            "--digest", digest,
            "--name", name,
            "--version", str(version),
            "--fd", str(sock.fileno()),
            "--max-batch-size", str(max_batch_size),
            "--max-wait-ms", str(max_wait_ms),
        ]  # fmt: skip
        if max_body_bytes is not None:
            command += ["--max-body-bytes", str(max_body_bytes)]
        if threads is not None:
            command += ["--threads", str(threads)]
        command += ["--deployment", name]
        if model_name is not None:
            command += ["--model-name", model_name]
        if grpc_port is not None:
            command += ["--grpc-port", str(grpc_port)]
        if grpc_max_message_bytes is not None:
            command += ["--grpc-max-message-bytes", str(grpc_max_message_bytes)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log_path, "ab") as log:
            offset = log.tell()
            log.write(
                f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting replica {name!r} version "
                f"{version} on 127.0.0.1:{port} ===\n".encode()
            )
            log.flush()
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(sock.fileno(),),
                start_new_session=True,
                close_fds=True,
                env=env,
                cwd=workdir,
            )
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)  # no child to remove it
        raise
    finally:
        sock.close()  # the child holds its own copy
    _children.add(proc)
    try:
        create_time = psutil.Process(proc.pid).create_time()
    except psutil.NoSuchProcess:  # died at once; wait_until_ready reports it
        create_time = 0.0
    return ReplicaProcess(
        pid=proc.pid,
        create_time=create_time,
        url=f"http://127.0.0.1:{port}",
        log_path=log_path,
        log_offset=offset,
        workdir=Path(workdir),
    )


def wait_until_ready(replica: ReplicaProcess, *, timeout: float = 60.0) -> None:
    """Poll ``/v2/health/ready`` until it answers 200, the process exits, or ``timeout`` passes.

    On exit or timeout the replica is stopped and BackendError is raised with the log's tail.
    """
    deadline = time.monotonic() + timeout
    ready_url = f"{replica.url}/v2/health/ready"
    with httpx.Client(timeout=httpx.Timeout(2.0, connect=1.0), trust_env=False) as client:
        while True:
            code = exit_code(replica.pid)
            if code is not None:
                raise BackendError(
                    f"replica process {replica.pid} exited with status {code} before it was "
                    f"ready; last lines of its log ({replica.log_path}):\n"
                    f"{log_tail(replica.log_path, offset=replica.log_offset)}",
                    log=str(replica.log_path),
                )
            try:
                if client.get(ready_url).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # still loading: the socket accepts, the app does not answer yet
            if time.monotonic() > deadline:
                stop_process_group(replica.pid, replica.create_time)
                tail = log_tail(replica.log_path, offset=replica.log_offset)
                raise BackendError(
                    f"replica process {replica.pid} was not ready at {ready_url} after "
                    f"{timeout:.0f}s and was stopped; last lines of its log "
                    f"({replica.log_path}):\n{tail}",
                    log=str(replica.log_path),
                )
            _wait_exit(replica.pid, 0.05)  # returns early if the process exits


def stop_process_group(pid: int, create_time: float | None, *, grace: float = STOP_GRACE_S) -> bool:
    """SIGTERM the replica's process group, wait up to ``grace``, then SIGKILL it.

    Returns True when a live process was signalled; False when it was already gone (or the pid
    now belongs to another process, which is left alone).
    """
    if not is_alive(pid, create_time):
        _reap(pid)
        return False
    workdir = _workdir_of(pid)
    _signal_group(pid, signal.SIGTERM)
    if not _wait_exit(pid, grace):
        _signal_group(pid, signal.SIGKILL)
        _wait_exit(pid, 5.0)
    _signal_group(pid, signal.SIGKILL)  # anything the replica left behind in its group
    _reap(pid)
    if workdir is not None:  # the replica removes it itself, unless it had to be killed
        shutil.rmtree(workdir, ignore_errors=True)
    return True


def is_alive(pid: int | None, create_time: float | None) -> bool:
    """Whether ``pid`` is still the process that was started at ``create_time`` (not a zombie)."""
    if not pid:
        return False
    if _children.get(pid) is not None:
        # Our own child: waitpid is authoritative, and its pid cannot be reused until reaped.
        # (psutil may show a dying multi-threaded leader as a zombie before waitpid reports it.)
        return exit_code(pid) is None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(proc.create_time() - create_time) < 0.05
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def exit_code(pid: int) -> int | None:
    """The exit status of a replica this process started, once it has exited; else None
    (-1: another process's replica that is gone, its status unknown here)."""
    if _children.get(pid) is None:
        if psutil.pid_exists(pid):
            _exited.pop(pid, None)  # the pid was reused
            return None
        return _exited.get(pid, -1)
    code = _children.poll(pid)
    if code is not None:  # reaped and forgotten: remember the status for whoever asks next
        if len(_exited) >= 1024:
            _exited.pop(next(iter(_exited)))
        _exited[pid] = code
    return code


def replica_log_path(
    ctx: Context, *, name: str, project: str | None = None, log_name: str = LOG_NAME
) -> Path:
    """``$SHIPYARD_HOME/deployments/<project>/<name>/replica.log`` (no project level if None)."""
    relative = f"{project}/{name}/{log_name}" if project else f"{name}/{log_name}"
    return safe_join(ctx.settings.deployments_dir, relative, field="name")


def probe_ready(client: httpx.Client, url: str) -> bool:
    """Whether the replica at ``url`` answers ``/v2/health/ready`` with 200 (within the
    client's timeout); any transport error or other status is False."""
    try:
        return client.get(f"{url}/v2/health/ready").status_code == 200
    except httpx.HTTPError:
        return False


def log_tail(path: Path, *, offset: int = 0, max_bytes: int = 4000, max_lines: int = 30) -> str:
    """The last lines of a log written since ``offset`` (empty string when there are none)."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            start = max(offset, size - max_bytes)
            fh.seek(start)
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-max_lines:])


# --- helpers ------------------------------------------------------------------------------------



def _workdir_of(pid: int) -> Path | None:
    """The replica's private working directory, if ``pid`` runs in one the launcher made."""
    try:
        cwd = Path(psutil.Process(pid).cwd())
    except (psutil.Error, OSError):
        return None
    if cwd.name.startswith(WORKDIR_PREFIX) and cwd.parent == Path(tempfile.gettempdir()):
        return cwd
    return None


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        # the leader is gone but its group may not be
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)


def _wait_exit(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` for ``pid`` to exit (reaping it if it is our child)."""
    proc = _children.get(pid)
    if proc is not None:
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    # Another process's child: it is gone once it is a zombie (its parent reaps it, not us).
    deadline = time.monotonic() + timeout
    try:
        process = psutil.Process(pid)
        while process.status() != psutil.STATUS_ZOMBIE:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with contextlib.suppress(psutil.TimeoutExpired):
                process.wait(timeout=min(remaining, 0.05))
                return True
    except psutil.NoSuchProcess:
        return True
    return True


def _reap(pid: int) -> None:
    exit_code(pid)  # polls (reaps) our child and forgets it once it has exited


def reap_exited() -> None:
    """Reap every replica this process started that has exited (no zombies in a long server)."""
    _children.reap_exited()


def sweep_workdirs(*, min_age_s: float = WORKDIR_SWEEP_AGE_S) -> list[Path]:
    """Remove the working directories of replicas that died without removing theirs (kill -9).

    A directory is removed when it is this user's, older than ``min_age_s`` (a replica being
    started has not entered its directory yet) and no live process has it as working directory.
    Returns what was removed.
    """
    now = time.time()
    candidates = []
    for path in Path(tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*"):
        with contextlib.suppress(OSError):
            info = path.lstat()
            if (
                stat.S_ISDIR(info.st_mode)
                and info.st_uid == os.getuid()
                and now - info.st_mtime >= min_age_s
            ):
                candidates.append(path)
    if not candidates:
        return []
    in_use: set[str] = set()
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            in_use.add(proc.cwd())
    removed = [path for path in candidates if str(path) not in in_use]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def run_in_workdir(argv: list[str]) -> int:
    """The replica's entry point: ``--workdir DIR shipyard.serving.replica REPLICA-ARGS...``.

    Runs the replica in ``DIR`` (which must be this process's working directory, made for it by
    :func:`spawn_replica`) and removes ``DIR`` when the replica exits, SIGTERM included.
    """
    if len(argv) < 3 or argv[0] != "--workdir" or argv[2] != REPLICA_MODULE:
        print(
            f"usage: python -m shipyard.serving.launcher --workdir DIR {REPLICA_MODULE} ARGS...",
            file=sys.stderr,
        )
        return 2
    workdir = Path(argv[1])
    if not workdir.name.startswith(WORKDIR_PREFIX) or Path.cwd().resolve() != workdir.resolve():
        print(
            f"shipyard replica: --workdir {workdir} must be the working directory the launcher "
            f"made ({WORKDIR_PREFIX}*); start replicas with shipyard deploy",
            file=sys.stderr,
        )
        return 2
    # Until uvicorn takes SIGTERM over (and after it hands it back), exit through `finally`.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    sys.argv = [REPLICA_MODULE, *argv[3:]]
    try:
        # exactly what `python -m shipyard.serving.replica` runs; its sys.exit() lands here
        runpy.run_module(REPLICA_MODULE, run_name="__main__", alter_sys=True)
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(run_in_workdir(sys.argv[1:]))
