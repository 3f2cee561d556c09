"""The workers of a job: their ranks, their environment, their combined log, and the gang.

Every executor starts a job's processes the same way (the local supervisor for all of them on
this machine, the Ray actor for the workers of one node):

- :func:`gang_layout` turns the policy's ``Placement`` (rank order) into one :class:`WorkerSlot`
  per worker: its global rank, its node's rank (in order of first appearance), its rank on that
  node and how many workers share the node;
- :func:`rank_env` gives each worker the variables ``torchrun`` sets (``MASTER_ADDR``,
  ``MASTER_PORT``, ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
  ``GROUP_RANK``, ...), so ``torch.distributed.init_process_group()`` (``env://``) works with no
  launcher in between - for a job of one worker too;
- :class:`PrefixedLog` copies every worker's stdout+stderr pipe into ONE log file, line by line,
  each line of rank N starting ``[rank N] `` (no prefix for a job of one worker); a line longer
  than :data:`MAX_LINE_BYTES` is cut into pieces, so memory stays bounded whatever the job prints;
- :class:`Gang` starts the workers (each in its own process group), and when one fails it stops
  the others (SIGTERM, a grace period, SIGKILL) and reports which rank failed - as torchrun's
  agent does: a gang lives and dies together.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from shipyard.compute.policy.base import Placement

# A line longer than this is written in pieces (each prefixed), so a job that prints megabytes
# without a newline costs us no more than this much memory per worker.
MAX_LINE_BYTES = 64 * 1024
READ_BYTES = 64 * 1024
# How often a reader thread looks whether it was asked to stop (while its pipe stays open).
_POLL_S = 0.2
DEFAULT_GRACE_S = 10.0
ROLE_NAME = "default"


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSlot:
    rank: int  # global rank, 0..world_size-1 (the placement's order)
    local_rank: int  # rank among the workers of its node
    node_rank: int  # its node's index, nodes numbered in order of first appearance (GROUP_RANK)
    local_world_size: int  # workers on its node
    node_id: str
    gpus: tuple[int, ...] = ()
    gpu_share: float = 0.0
    node_count: int = 1  # nodes the whole gang spans (GROUP_WORLD_SIZE)


@dataclass(frozen=True, slots=True, kw_only=True)
class GangResult:
    ok: bool
    exit_code: int  # 0, the failed worker's code (negative: killed by that signal), or rank 0's
    failed_rank: int | None  # the worker that failed first; None when ok or stopped from outside
    message: str


def gang_layout(placement: Placement) -> list[WorkerSlot]:
    """One slot per worker of ``placement``, in rank order (``placement.workers[0]`` is rank 0)."""
    node_rank: dict[str, int] = {}
    per_node: dict[str, int] = {}
    for worker in placement.workers:
        node_rank.setdefault(worker.node_id, len(node_rank))
        per_node[worker.node_id] = per_node.get(worker.node_id, 0) + 1
    seen: dict[str, int] = {}
    slots: list[WorkerSlot] = []
    for rank, worker in enumerate(placement.workers):
        local = seen.get(worker.node_id, 0)
        seen[worker.node_id] = local + 1
        slots.append(
            WorkerSlot(
                rank=rank,
                local_rank=local,
                node_rank=node_rank[worker.node_id],
                local_world_size=per_node[worker.node_id],
                node_id=worker.node_id,
                gpus=tuple(worker.gpus),
                gpu_share=worker.gpu_share,
                node_count=len(node_rank),
            )
        )
    return slots


def rank_env(
    slot: WorkerSlot,
    *,
    world_size: int,
    master_addr: str,
    master_port: int,
    job_id: str,
    restart_count: int = 0,
    inherited: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The variables torchrun's agent sets for worker ``slot`` (torch.distributed.elastic).

    ``restart_count`` is the number of earlier attempts (TORCHELASTIC_RESTART_COUNT). As torchrun
    does, ``OMP_NUM_THREADS`` is set to 1 when several workers share a node, unless ``inherited``
    (the environment the worker already gets) sets it. ``TORCHELASTIC_USE_AGENT_STORE`` is
    False: rank 0 hosts the rendezvous store itself, as there is no agent.
    """
    if world_size < 1 or not 0 <= slot.rank < world_size:
        raise ValueError(f"rank {slot.rank} is not in a world of {world_size} workers")
    if not 0 < master_port < 65536:
        raise ValueError(f"master_port {master_port} is not a TCP port")
    env = {
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "RANK": str(slot.rank),
        "LOCAL_RANK": str(slot.local_rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(slot.local_world_size),
        "GROUP_RANK": str(slot.node_rank),
        "GROUP_WORLD_SIZE": str(slot.node_count),
        "ROLE_NAME": ROLE_NAME,
        "ROLE_RANK": str(slot.rank),
        "ROLE_WORLD_SIZE": str(world_size),
        "TORCHELASTIC_RUN_ID": job_id,
        "TORCHELASTIC_RESTART_COUNT": str(restart_count),
        "TORCHELASTIC_MAX_RESTARTS": "0",
        "TORCHELASTIC_USE_AGENT_STORE": "False",
    }
    parent = os.environ if inherited is None else inherited
    if slot.local_world_size > 1 and "OMP_NUM_THREADS" not in parent:
        env["OMP_NUM_THREADS"] = "1"
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the kernel's choice), for rank 0's rendezvous store."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class PrefixedLog:
    """One log file fed by the pipes of every worker (see the module docstring).

    Each attached pipe gets a thread that reads it until EOF and appends whole lines (with
    ``[rank N] `` in front when ``prefix``) with single ``O_APPEND`` writes, so lines of two
    ranks never interleave. ``close`` waits for every pipe to end (the workers are gone), at most
    ``timeout`` seconds: a pipe a stray background process still holds open is then abandoned,
    its last partial line flushed.
    """

    def __init__(self, path: Path, *, prefix: bool) -> None:
        self.path = Path(path)
        self.prefix = prefix
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._at_line_start = True
        self._closed = False

    def attach(self, rank: int, stream: IO[bytes]) -> None:
        """Copy ``stream`` (a worker's pipe) into the log from a thread; it closes the stream."""
        if self._closed:
            raise ValueError("the log is closed")
        thread = threading.Thread(
            target=self._copy, args=(rank, stream), name=f"shipyard-log-rank{rank}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def write_line(self, text: str) -> None:
        """Append one line of ours (e.g. ``shipyard: rank 1 exited with code 3``)."""
        data = text.rstrip("\n").encode("utf-8", errors="replace") + b"\n"
        with self._lock:
            if self._closed:
                raise ValueError("the log is closed")
            if not self._at_line_start:
                data = b"\n" + data
            self._write(data)

    def close(self, timeout: float = 5.0) -> None:
        """Wait (at most ``timeout`` s) for every pipe to reach EOF, flush, close the file."""
        if self._closed:
            return
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._stop.set()
        for thread in self._threads:
            thread.join(_POLL_S * 5)
        with self._lock:
            self._closed = True
            os.close(self._fd)

    def __enter__(self) -> PrefixedLog:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # --- the reader threads ------------------------------------------------------------------

    def _copy(self, rank: int, stream: IO[bytes]) -> None:
        head = f"[rank {rank}] ".encode() if self.prefix else b""
        pending = b""
        try:
            fd = stream.fileno()
            poller = select.poll()  # not select(): no FD_SETSIZE limit in a busy process
            poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
            while True:
                if self._stop.is_set():
                    break
                if not poller.poll(_POLL_S * 1000):
                    continue
                chunk = os.read(fd, READ_BYTES)
                if not chunk:
                    break
                if not self.prefix:
                    self._emit(chunk)
                    continue
                pending += chunk
                lines = pending.split(b"\n")
                pending = lines.pop()
                out = [
                    head + line[at : at + MAX_LINE_BYTES] + b"\n"
                    for line in lines
                    for at in range(0, max(len(line), 1), MAX_LINE_BYTES)
                ]
                while len(pending) >= MAX_LINE_BYTES:
                    out.append(head + pending[:MAX_LINE_BYTES] + b"\n")
                    pending = pending[MAX_LINE_BYTES:]
                if out:
                    self._emit(b"".join(out))
        except (OSError, ValueError):
            pass  # the pipe went away under us: nothing more to copy
        finally:
            if pending:
                self._emit(head + pending + b"\n")
            with contextlib.suppress(OSError, ValueError):
                stream.close()

    def _emit(self, data: bytes) -> None:
        with self._lock:
            if self._closed:
                return
            self._write(data)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._at_line_start = data.endswith(b"\n")


class Gang:
    """The workers of one job on one node (for the local executor: all of them).

    Each worker runs in its own session and process group, so stopping one stops everything it
    started; its stdout and stderr go to ``log`` (``PrefixedLog.attach``). ``preexec`` runs in
    every child before ``exec`` (limits, user switch).
    """

    def __init__(
        self,
        *,
        commands: Sequence[Sequence[str]],
        envs: Sequence[Mapping[str, str]],
        cwd: Path,
        log: PrefixedLog,
        ranks: Sequence[int],
        preexec: Callable[[], None] | None = None,
        grace_s: float = DEFAULT_GRACE_S,
    ) -> None:
        if not commands or not len(commands) == len(envs) == len(ranks):
            raise ValueError(
                f"a gang needs one command, env and rank per worker; got {len(commands)} "
                f"commands, {len(envs)} envs and {len(ranks)} ranks"
            )
        self._commands = [list(command) for command in commands]
        self._envs = [dict(env) for env in envs]
        self._cwd = cwd
        self._log = log
        self._ranks = list(ranks)
        self._preexec = preexec
        self._grace_s = grace_s
        self._procs: list[subprocess.Popen[bytes]] = []
        self._result: GangResult | None = None
        self._stopped = False

    def start(self) -> None:
        """Start every worker; raises ``OSError`` (the others stopped) if one cannot start."""
        if self._procs:
            raise RuntimeError("the gang was already started")
        for command, env, rank in zip(self._commands, self._envs, self._ranks, strict=True):
            try:
                proc = subprocess.Popen(
                    command,
                    cwd=self._cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                    preexec_fn=self._preexec,
                )
            except (OSError, subprocess.SubprocessError) as exc:
                self._stop_all(0.0)
                reason = getattr(exc, "strerror", None) or str(exc)
                raise OSError(f"could not start rank {rank} ({command[0]!r}): {reason}") from exc
            self._procs.append(proc)
            assert proc.stdout is not None
            self._log.attach(rank, proc.stdout)

    def pids(self) -> list[int]:
        """The workers' pids in rank order (each is also its process group's id)."""
        return [proc.pid for proc in self._procs]

    @property
    def ranks(self) -> list[int]:
        return list(self._ranks)

    def poll(self) -> GangResult | None:
        """None while any worker runs and none failed; else the gang's result (see the class).

        When a worker has failed, the others are stopped first (this call then takes up to the
        grace period).
        """
        if self._result is not None:
            return self._result
        if not self._procs:
            raise RuntimeError("the gang was not started")
        codes = [proc.poll() for proc in self._procs]
        if self._stopped and all(code is not None for code in codes):
            self._result = GangResult(
                ok=False,
                exit_code=int(codes[0] or 0),
                failed_rank=None,
                message=f"the {_workers(len(codes))} were stopped",
            )
            return self._result
        failed = [(rank, code) for rank, code in zip(self._ranks, codes, strict=True) if code]
        if failed and not self._stopped:
            rank, code = failed[0]
            others = [proc for proc in self._procs if proc.poll() is None]
            self._stop_all(self._grace_s)
            stopped = f"; stopped the other {_workers(len(others))}" if others else ""
            self._result = GangResult(
                ok=False,
                exit_code=int(code),
                failed_rank=rank,
                message=f"rank {rank} {describe_exit(int(code))}{stopped}",
            )
            return self._result
        if all(code == 0 for code in codes):
            self._result = GangResult(
                ok=True,
                exit_code=0,
                failed_rank=None,
                message=f"all {_workers(len(codes))} exited with code 0",
            )
            return self._result
        return None

    def wait(self, timeout: float | None = None) -> GangResult | None:
        """Poll until the gang ends (its result) or ``timeout`` seconds pass (None)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = 0.01
        while True:
            result = self.poll()
            if result is not None:
                return result
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(interval)
            interval = min(0.2, interval * 2)

    def stop(self, grace_s: float) -> None:
        """SIGTERM every worker's process group; SIGKILL what is left after ``grace_s``."""
        self._stopped = True
        self._stop_all(grace_s)

    # --- helpers -------------------------------------------------------------------------------

    def _stop_all(self, grace_s: float) -> None:
        live = [proc for proc in self._procs if proc.poll() is None]
        groups = [proc.pid for proc in self._procs]
        _signal_groups(groups, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        # Whatever is left (a worker that ignores SIGTERM, or what it started in its group).
        _signal_groups(groups, signal.SIGKILL)
        for proc in self._procs:
            proc.wait()


def describe_exit(code: int) -> str:
    """``exited with code 3`` / ``was killed by SIGKILL`` for a Popen return code."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


def _signal_groups(groups: Sequence[int], sig: signal.Signals) -> None:
    own = os.getpgid(0)
    for group in groups:
        if group == own:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, sig)


def _workers(count: int) -> str:
    return f"{count} worker" if count == 1 else f"{count} workers"


__all__ = [
    "Gang",
    "GangResult",
    "PrefixedLog",
    "WorkerSlot",
    "describe_exit",
    "free_port",
    "gang_layout",
    "rank_env",
]
