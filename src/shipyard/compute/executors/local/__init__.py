"""The local executor: every job as a detached supervisor process on this machine.

``launch`` starts ``python -m shipyard.compute.executors.local.supervisor JOB_ID ATTEMPT``
(``launcher``); the supervisor runs every worker of the job as one gang, meters and limits them,
polls the job's row for ``cancel_requested`` / ``preempt_requested`` and records the outcome
itself (``compute.records``: ``finish_job``, or ``requeue_job`` after a preemption). So
``observe`` only reports supervisors that are gone ("lost": checked by pid *and* start time, so a
reused pid does not fool it); ``stop`` for a cancel, a preemption or a timeout only signals the
supervisor to look at the row at once (the pipeline has already set the flag; the supervisor
sends SIGTERM, waits the grace period, then SIGKILL); for a lost job it stops whatever is left of
the job's processes.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping
from typing import Any

from shipyard.compute import gpus
from shipyard.compute.executors.base import (
    Executor,
    Launch,
    NodeInfo,
    Observation,
    StopReason,
)
from shipyard.compute.executors.local.launcher import (
    KILL_GRACE_S,
    LOOK_SIGNAL,
    children,
    start_supervisor,
)
from shipyard.compute.processes import kill_job, process_alive
from shipyard.compute.records import SUPERVISOR_LOG_FILE, log_path
from shipyard.errors import InvalidStateError
from shipyard.settings import Settings


class LocalExecutor(Executor):
    name = "local"

    def __init__(self, url: str = "local", settings: Settings | None = None) -> None:
        self.url = url
        self.settings = settings or Settings.from_env()

    def nodes(self) -> list[NodeInfo]:
        return [gpus.local_node(self.settings)]

    def launch(self, ctx: Any, launch: Launch) -> dict[str, Any]:
        try:
            return start_supervisor(ctx, launch.job_id, attempt=launch.attempt, token=launch.token)
        except OSError as exc:
            raise InvalidStateError(
                f"could not start the job's supervisor: {exc}", field="executor"
            ) from None

    def observe(self, ctx: Any, refs: Mapping[str, Mapping[str, Any]]) -> dict[str, Observation]:
        children.reap_exited()  # supervisors this process started that have exited
        here = socket.gethostname()
        seen: dict[str, Observation] = {}
        for job_id, ref in refs.items():
            pid = ref.get("supervisor_pid")
            if not isinstance(pid, int) or ref.get("host", here) != here:
                continue  # not ours to judge (another machine's supervisor)
            if process_alive(pid, ref.get("supervisor_started")):
                continue
            seen[job_id] = Observation(
                job_id=job_id,
                state="lost",
                node_id=here,
                message=(
                    f"supervisor lost: its process (pid {pid}) is gone, so the job's processes "
                    f"were stopped; see {SUPERVISOR_LOG_FILE} in the job's folder, and submit "
                    "the job again"
                ),
            )
        return seen

    def stop(
        self,
        ctx: Any,
        job_id: str,
        ref: Mapping[str, Any],
        *,
        reason: StopReason,
        grace_s: float,
    ) -> None:
        if reason == "lost":
            leader = ref.get("pid")
            kill_job(job_id, leader if isinstance(leader, int) else None, grace=grace_s)
            return
        # cancel / preempt / timeout: the flag is on the row, which the supervisor polls; tell
        # it to look now (only the very process on record, on this machine).
        pid = ref.get("supervisor_pid")
        if (
            not isinstance(pid, int)
            or ref.get("host", socket.gethostname()) != socket.gethostname()
        ):
            return
        if process_alive(pid, ref.get("supervisor_started")):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, LOOK_SIGNAL)

    def read_logs(
        self, ctx: Any, job_id: str, ref: Mapping[str, Any] | None, *, offset: int, limit: int
    ) -> tuple[bytes, int]:
        try:
            with open(log_path(ctx, job_id), "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                fh.seek(offset)
                return fh.read(limit), size
        except FileNotFoundError:
            return b"", 0


__all__ = ["KILL_GRACE_S", "LocalExecutor"]
