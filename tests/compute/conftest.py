"""Compute fixtures: contexts with declared capacity, and a clean-up that leaves no job running."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from shipyard.compute.processes import kill_job, process_alive
from shipyard.context import Context, open_context
from shipyard.domain.models import JobSpec, JobStatus
from shipyard.settings import Settings
from shipyard.store.tables import JobRow

MakeCtx = Callable[..., Context]


@pytest.fixture
def make_ctx(ctx: Context, settings: Settings) -> Iterator[MakeCtx]:
    """Contexts on the test's home with other capacity settings (``cpus=2``, ``gpus=2``, ...).

    On the way out, stops every job the test left behind: queued ones are cancelled, running
    ones lose their supervisor and every process, so no test leaks processes into the next.
    """

    def make(**overrides: Any) -> Context:
        base = {"cpus": 8.0, "memory_mb": 16384, "gpus": 0}
        base.update(overrides)
        return open_context(dataclasses.replace(settings, **base), actor="tester")

    yield make
    _stop_everything(ctx)


@pytest.fixture
def cctx(make_ctx: MakeCtx) -> Context:
    """A context whose capacity does not depend on the machine running the tests."""
    return make_ctx()


def python_job(code: str, **fields: Any) -> JobSpec:
    """A job that runs ``code`` with this interpreter."""
    return JobSpec(command=[sys.executable, "-c", code], **fields)


def gated(gate: Path, *, before: str = "", after: str = "") -> str:
    """Python code that runs ``before``, waits until ``gate`` exists, then runs ``after``."""
    return (
        "import os, sys, time\n"
        f"{before}\n"
        f"while not os.path.exists({str(gate)!r}):\n"
        "    time.sleep(0.02)\n"
        f"{after}\n"
    )


def gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie waiting for its parent counts as gone)."""
    return not process_alive(pid, None)


def job_row(ctx: Context, job_id: str) -> JobRow:
    with ctx.db.read() as s:
        row = s.get(JobRow, job_id)
        assert row is not None
        return row


def _stop_everything(ctx: Context) -> None:
    with ctx.db.transaction() as s:
        s.execute(
            update(JobRow)
            .where(JobRow.status == JobStatus.QUEUED.value)
            .values(status=JobStatus.CANCELLED.value)
        )
        every = s.execute(select(JobRow.id, JobRow.status, JobRow.executor_ref)).all()
    for job_id, status, ref in every:
        ref = ref or {}
        sup_pid, sup_started, pid = (
            ref.get("supervisor_pid"),
            ref.get("supervisor_started"),
            ref.get("pid"),
        )
        if (
            status == JobStatus.RUNNING.value
            and sup_pid is not None
            and process_alive(sup_pid, sup_started)
        ):
            with contextlib.suppress(ProcessLookupError):
                os.kill(sup_pid, signal.SIGKILL)
        kill_job(job_id, pid, grace=1.0)  # finished jobs too: a failed test may leave a daemon
