"""One worker of a job on a Ray node: the actor ``RayExecutor`` starts for each rank.

This module is imported on the Ray cluster's nodes (by Ray's worker processes) and, lazily, by
``executors.ray``; it never imports ``ray`` at import time - ``executors.ray`` wraps
:class:`WorkerActor` with ``ray.remote`` - so nothing that imports shipyard pulls Ray in.

An actor lives in a node-local folder (``$TMPDIR/shipyard-ray-<uid>/<job>-<attempt>-<rank>``):
it unpacks the job's code snapshot there, runs the command as a subprocess in its own process
group (``compute.workers.Gang`` of one worker) with the environment the executor computed plus
what only the node knows (its ``PATH``/locale, the Ray-assigned GPUs in
``CUDA_VISIBLE_DEVICES``, the torchrun variables), writes its output to a log file there
(``[rank N] `` prefixes for gangs, ``compute.workers.PrefixedLog``), enforces the max runtime,
samples usage over the process tree, and answers ``poll`` / ``read_log`` / ``stop``.

**Declared outputs.** The node has neither the server's database nor its blob store, so rank 0's
actor, once the job's process ended with an outcome (exited, failed, cancelled, timed out - not
stopped for a preemption, whose next attempt writes them again), uploads the declared outputs
from its folder to the server's REST API with the job's token (``compute.outputs.upload_outputs``:
the same confinement and the same "shipyard: ..." notes as the local executor, appended to its
log), and only then reports itself exited, with the stored artifact paths in its ``poll``. While
it uploads it is ``storing`` (the executor still sees the job running). Other ranks' folders are
not collected: rank 0 writes a gang's results, as in torchrun.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shipyard.compute.processes import UsageMeter
from shipyard.compute.sandbox import PASSED_PREFIXES, PASSED_VARIABLES
from shipyard.compute.snapshot import extract_code, list_code
from shipyard.compute.workers import Gang, PrefixedLog, WorkerSlot, free_port, rank_env

POLL_S = 0.1
# Stop reasons after which the declared outputs are not stored: the job is requeued (preempt), or
# the actor is being removed (cleanup) or lost with a rank of its gang.
_NO_OUTPUTS = frozenset({"preempt", "cleanup", "lost"})
_PR_SET_PDEATHSIG = 1


class WorkerActor:
    """The worker of rank ``rank`` of job ``job_id`` (attempt ``attempt``); see the module doc."""

    def __init__(
        self,
        *,
        job_id: str,
        attempt: int,
        rank: int,
        world_size: int,
        max_runtime_s: float | None = None,
        gpu_fraction: float | None = None,
        gpu_memory_mb: int | None = None,
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.rank = rank
        self.world_size = world_size
        self.max_runtime_s = max_runtime_s
        self.gpu_fraction = gpu_fraction
        self.gpu_memory_mb = gpu_memory_mb
        root = Path(tempfile.gettempdir()) / f"shipyard-ray-{os.geteuid()}"
        self.folder = root / f"{job_id}-{attempt}-{rank}"
        self.log_path = self.folder / "output.log"
        self._lock = threading.Lock()
        self._gang: Gang | None = None
        self._log: PrefixedLog | None = None
        self._meter = UsageMeter()
        self._started_at: float | None = None
        self._wall = 0.0
        self._state = "created"  # created -> running -> exited
        self._exit_code: int | None = None
        self._exited_at: float | None = None  # wall clock, to tell which rank failed first
        self._stop_reason: str | None = None
        self._message = ""
        self._command = ""
        self._master: dict[str, Any] | None = None
        self._outputs: dict[str, Any] | None = None  # where rank 0 stores the declared outputs
        self._code_files: list[str] = []
        self._cwd: Path | None = None
        self._stored: list[str] | None = None  # artifact paths stored from the outputs

    # --- what the executor asks ----------------------------------------------------------------

    def node(self) -> dict[str, Any]:
        """Where this worker is: the Ray node id, its IP, its host name, its GPUs, a free port."""
        import ray

        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "address": ray.util.get_node_ip_address(),  # type: ignore[no-untyped-call]
            "hostname": socket.gethostname(),
            "gpus": [int(str(gpu)) for gpu in ray.get_gpu_ids()],
            "free_port": free_port("0.0.0.0"),  # MASTER_PORT, when this is rank 0
        }

    def rendezvous(self) -> dict[str, Any]:
        """Rank 0's address and the free port its workers meet at (MASTER_ADDR, MASTER_PORT)."""
        import ray

        with self._lock:  # once: every rank asks, and rank 0 itself
            if self._master is None:
                self._master = {
                    "address": ray.util.get_node_ip_address(),  # type: ignore[no-untyped-call]
                    "port": free_port("0.0.0.0"),
                }
            return self._master

    def start(
        self,
        *,
        command: list[str],
        env: Mapping[str, str],
        code: bytes | None,
        slot: dict[str, Any],
        rank0: Any,
        served: bool,
        outputs: Mapping[str, Any] | None = None,
    ) -> str | None:
        """Prepare the folder and start the command; None, or why it could not start (the
        worker then reports itself exited with code 127 and that message). ``rank0`` is rank
        0's actor (None for rank 0 itself), asked for the rendezvous address. ``outputs`` (rank
        0's, when the job declared some): ``declared``, and the ``server_url``, ``token``,
        ``project`` and ``run_id`` they are uploaded with when the job ends."""
        import ray

        with self._lock:
            if self._state != "created":
                return None
            if self._stop_reason is not None:  # stopped before it started
                self._finish(exit_code=-int(signal.SIGTERM), message="stopped before it started")
                return None
            self._state = "starting"
        try:
            master = (
                self.rendezvous()
                if rank0 is None
                else ray.get(rank0.rendezvous.remote(), timeout=_RENDEZVOUS_TIMEOUT_S)
            )
        except Exception as exc:  # rank 0 is gone: the gang cannot meet
            message = f"could not reach rank 0 for the rendezvous: {_text(exc)}"
            with self._lock:
                self._fail_to_start(message)
            return message
        try:
            cwd = self._prepare(code, served=served)
            code_files = list_code(code) if code is not None and outputs else []
        except Exception as exc:  # a bad snapshot, a full disk: the job fails, saying why
            message = f"could not prepare the job's code on this node: {_text(exc)}"
            with self._lock:
                self._fail_to_start(message)
            return message
        full_env = self._environment(
            env, slot, str(master["address"]), int(master["port"]), served=served
        )
        with self._lock:
            self._command = command[0]
            self._outputs = dict(outputs) if outputs and outputs.get("declared") else None
            self._code_files = code_files
            self._cwd = cwd
            self._log = PrefixedLog(self.log_path, prefix=self.world_size > 1)
            self._gang = Gang(
                commands=[_resolve_command(command, cwd, full_env)],
                envs=[full_env],
                cwd=cwd,
                log=self._log,
                ranks=[self.rank],
                preexec=_die_with_parent,
            )
        started = threading.Event()
        failure: list[str] = []
        thread = threading.Thread(
            target=self._monitor,
            args=(started, failure),
            name=f"shipyard-worker-{self.rank}",
            daemon=True,
        )
        thread.start()
        started.wait()
        return failure[0] if failure else None

    def poll(self) -> dict[str, Any]:
        """The worker's state - ``created``, ``starting``, ``running``, ``storing`` (its declared
        outputs) or ``exited`` with its exit code, the reason it was stopped for (``cancel``,
        ``preempt``, ``timeout``, ``gang``) and the artifact paths stored from its outputs
        (``outputs``; None when none were to be stored) - and its usage."""
        with self._lock:
            wall = self._wall
            if self._state == "running" and self._started_at is not None:
                wall = time.monotonic() - self._started_at
            return {
                "state": self._state,
                "exit_code": self._exit_code,
                "exited_at": self._exited_at,
                "stop_reason": self._stop_reason,
                "message": self._message,
                "outputs": self._stored,
                "usage": {
                    "cpu_seconds": round(self._meter.cpu_seconds, 3),
                    "peak_memory_mb": round(self._meter.peak_memory_mb, 3),
                    "wall_seconds": round(wall, 3),
                },
                "log_size": _size(self.log_path),
            }

    def read_log(self, offset: int, limit: int) -> tuple[bytes, int]:
        """Up to ``limit`` bytes of this worker's log from ``offset``, and its size now."""
        try:
            with open(self.log_path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                fh.seek(max(0, offset))
                return fh.read(max(0, limit)), size
        except FileNotFoundError:
            return b"", 0

    def stop(self, reason: str, grace_s: float) -> None:
        """SIGTERM the worker's process group, SIGKILL after ``grace_s``; returns at once."""
        with self._lock:
            # Once the process is gone (storing its outputs, exited) a stop changes nothing.
            if self._stop_reason is None and self._state not in ("storing", "exited"):
                self._stop_reason = reason
            gang = self._gang if self._state == "running" else None
        if gang is not None:
            threading.Thread(target=gang.stop, args=(grace_s,), daemon=True).start()

    def cleanup(self) -> None:
        """Stop what still runs at once and remove the node-local folder."""
        with self._lock:
            gang = self._gang if self._state == "running" else None
            if self._stop_reason is None:
                self._stop_reason = "cleanup"
        if gang is not None:
            gang.stop(0.0)
        shutil.rmtree(self.folder, ignore_errors=True)

    # --- helpers -------------------------------------------------------------------------------

    def _prepare(self, code: bytes | None, *, served: bool) -> Path:
        if self.folder.exists():  # an earlier actor of the same name left it
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, mode=0o700)
        if served:
            for sub in ("home", "tmp"):
                (self.folder / sub).mkdir(mode=0o700)
        if code is None:
            work = self.folder / "work"
            work.mkdir()
            return work
        dest = self.folder / "code"
        extract_code(code, dest)
        return dest

    def _environment(
        self,
        env: Mapping[str, str],
        slot: dict[str, Any],
        master_addr: str,
        master_port: int,
        *,
        served: bool,
    ) -> dict[str, str]:
        import ray

        # What only this node knows (its PATH, locale and time zone; and its HOME for a job of
        # an embedded home, which runs as the user), then what the executor computed.
        passed = (*PASSED_VARIABLES, *(() if served else ("HOME", "USER", "LOGNAME")))
        full = {
            key: value
            for key, value in os.environ.items()
            if key in passed or key.startswith(PASSED_PREFIXES)
        }
        full.setdefault("PATH", os.defpath)
        full.update(env)
        if served:
            full["HOME"] = str(self.folder / "home")
            full["TMPDIR"] = str(self.folder / "tmp")
        gpus = [str(gpu) for gpu in ray.get_gpu_ids()]
        if self.gpu_fraction:
            gpus = gpus[:1]
            full["SHIPYARD_GPU_FRACTION"] = f"{self.gpu_fraction:g}"
            full["SHIPYARD_GPU_MEMORY_MB"] = str(self.gpu_memory_mb or 0)
        full["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        worker = WorkerSlot(**{**slot, "gpus": tuple(int(g) for g in gpus)})
        full.update(
            rank_env(
                worker,
                world_size=self.world_size,
                master_addr=master_addr,
                master_port=master_port,
                job_id=self.job_id,
                restart_count=self.attempt - 1,
                inherited=full,
            )
        )
        full["PYTHONUNBUFFERED"] = "1"
        return full

    def _monitor(self, started: threading.Event, failure: list[str]) -> None:
        # The job's process is started from this thread, which lives as long as the job: with
        # PR_SET_PDEATHSIG the kernel kills the job if this actor dies (its node is killed).
        gang, log = self._gang, self._log
        assert gang is not None and log is not None
        try:
            gang.start()
        except OSError as exc:
            log.close()
            cause = exc.__cause__
            reason = getattr(cause, "strerror", None) or (str(cause) if cause else str(exc))
            message = f"could not start command {self._command!r}: {reason}"
            if self.world_size > 1:
                message = str(exc)
            with self._lock:
                self._fail_to_start(message)
            failure.append(message)
            started.set()
            return
        with self._lock:
            self._state = "running"
            self._started_at = time.monotonic()
            pid = gang.pids()[0]
            early = self._stop_reason  # stopped while it was starting
        if early is not None:
            threading.Thread(target=gang.stop, args=(_TIMEOUT_GRACE_S,), daemon=True).start()
        self._meter.sample(pid)
        started.set()
        while True:
            result = gang.poll()
            if result is not None:
                break
            time.sleep(POLL_S)
            self._meter.sample(pid)
            limit = self.max_runtime_s
            assert self._started_at is not None
            if limit is not None and time.monotonic() - self._started_at > limit:
                self.stop("timeout", grace_s=_TIMEOUT_GRACE_S)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # what the job left running in its group ends with it
        log.close()
        with self._lock:
            assert self._started_at is not None
            self._wall = time.monotonic() - self._started_at
            store = self._outputs is not None and self._stop_reason not in _NO_OUTPUTS
            if store:
                self._state = "storing"
            else:
                self._finish(exit_code=result.exit_code, message=result.message)
        if store:
            stored = self._store_outputs()
            with self._lock:
                self._stored = stored
                self._finish(exit_code=result.exit_code, message=result.message)

    def _store_outputs(self) -> list[str]:
        """Upload the declared outputs as artifacts of the job's run and note in the log what
        became of them; the stored paths. Whatever happens here, the job's outcome stands."""
        # Here, not at the top: it brings the SDK and the store's modules (~0.4 s), which only
        # rank 0 of a job with declared outputs needs, once, at its end.
        from shipyard.compute.outputs import upload_outputs

        where = self._outputs
        assert where is not None and self._cwd is not None
        url = where.get("server_url")
        if not url:
            lines = [
                "shipyard: the declared outputs were not stored: the job ran on a Ray node and "
                "no shipyard server was named to send them to (run the Ray executor from "
                "'shipyard server --executor ray://...')"
            ]
            stored: list[str] = []
        else:
            try:
                report = upload_outputs(
                    server_url=str(url),
                    token=where.get("token"),
                    project=str(where["project"]),
                    run_id=where.get("run_id"),
                    workdir=self._cwd,
                    declared=list(where["declared"]),
                    code_files=self._code_files,
                )
                lines, stored = report.lines(), list(report.stored)
            except Exception as exc:  # the outcome is reported whatever became of the outputs
                lines, stored = [f"shipyard: could not store the job's outputs: {exc!r}"], []
        with contextlib.suppress(OSError), open(self.log_path, "ab") as fh:
            fh.write("".join(f"{line}\n" for line in lines).encode())
        return stored

    def _fail_to_start(self, message: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as fh:
            prefix = f"[rank {self.rank}] " if self.world_size > 1 else ""
            fh.write(f"{prefix}shipyard: {message}\n".encode())
        self._finish(exit_code=127, message=message)

    def _finish(self, *, exit_code: int, message: str) -> None:
        self._state = "exited"
        self._exit_code = exit_code
        self._exited_at = time.time()
        self._message = message


_TIMEOUT_GRACE_S = 10.0
_RENDEZVOUS_TIMEOUT_S = 300.0


def _die_with_parent() -> None:
    """In the child before exec: be killed when the thread that started us ends (the actor)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def _resolve_command(command: list[str], cwd: Path, env: Mapping[str, str]) -> list[str]:
    """A bare name that is not on PATH but is a file of the code runs from the code folder."""
    exe = command[0]
    if "/" in exe or shutil.which(exe, path=env.get("PATH", os.defpath)) is not None:
        return list(command)
    local = cwd / exe
    return [str(local), *command[1:]] if local.is_file() else list(command)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _text(exc: BaseException) -> str:
    return str(getattr(exc, "message", None) or exc)


# --- placement groups, run as Ray tasks in the cluster -----------------------------------------
# Through Ray Client every placement-group call is a task of its own; these do a job's whole
# placement-group work in one task each (``executors.ray`` wraps them with ``ray.remote``).


def create_group(
    name: str,
    bundles: list[dict[str, float]],
    strategy: str,
    timeout_s: float,
    selector: dict[str, str] | None = None,
) -> dict[str, Any] | None:
    """A detached placement group ``name`` (one left by an earlier try of this very attempt is
    removed first), every bundle on a node matching the label ``selector`` when one is given,
    ready within ``timeout_s``: its id and each bundle's node; None (and nothing left) when Ray
    cannot place it in time."""
    from ray.util.placement_group import (
        get_placement_group,
        placement_group,
        placement_group_table,
        remove_placement_group,
    )

    with contextlib.suppress(ValueError):
        remove_placement_group(get_placement_group(name))
    group = placement_group(
        bundles,
        strategy=strategy,
        name=name,
        lifetime="detached",
        bundle_label_selector=[dict(selector) for _ in bundles] if selector else None,
    )
    if not group.wait(timeout_s):
        remove_placement_group(group)
        return None
    table = placement_group_table(group)
    return {
        "id": group.id.hex(),
        "nodes": [str(table["bundles_to_node_id"][i]) for i in range(len(bundles))],
    }


def remove_group(name: str) -> bool:
    """Remove placement group ``name``; False when there was none."""
    from ray.util.placement_group import get_placement_group, remove_placement_group

    try:
        group = get_placement_group(name)
    except ValueError:
        return False
    remove_placement_group(group)
    return True


__all__ = ["WorkerActor", "create_group", "remove_group"]
