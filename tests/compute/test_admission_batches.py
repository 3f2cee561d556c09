"""The admission pipeline writes one step's work in a few transactions, not a few per job.

A step records the jobs its look found finished, decides, admits and issues the admitted jobs'
tokens in ONE transaction, and stores the launched jobs' references in another
(``records.record_launches``); every audit event is still written, one per change, and the
HMAC chain still verifies - on SQLite and on PostgreSQL, where a batch of events is inserted in
one flush. The per-row leases hold inside a batch: a reference is stored only while the lease
is ours, and a cancel that came during the launch still stops the job.

``BatchExecutor`` is a real ``Executor`` subclass registered only here: it starts nothing,
records launches and stops, and reports a job finished once a test says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select

from shipyard import wiring
from shipyard.compute import admission, jobs
from shipyard.compute.executors.base import (
    Executor,
    Launch,
    NodeInfo,
    Observation,
    StopReason,
)
from shipyard.compute.policy.base import Node
from shipyard.context import Context, open_context
from shipyard.domain.models import JobSpec, JobStatus, Resources
from shipyard.security.audit import list_events, verify
from shipyard.settings import Settings
from shipyard.store.engine import forget_database
from shipyard.store.tables import JobRow
from tests.pg import create_database, drop_database

SLOTS = 64
# What every job that runs once to success leaves in the audit log.
JOB_EVENTS = {"run.create", "job.submit", "job.start", "token.issue_job", "job.finish"}


class BatchExecutor(Executor):
    """Runs nothing; ``SLOTS`` one-CPU slots; a job finishes when ``done`` names it."""

    name = "batch"

    def __init__(self, url: str, settings: Settings) -> None:
        self.launched: list[Launch] = []
        self.stopped: list[tuple[str, StopReason]] = []
        self.done: set[str] = set()
        self.on_launch: Any = None  # called with the Launch, before it returns

    def nodes(self) -> list[NodeInfo]:
        return [NodeInfo(node=Node(id="n0", cpus=float(SLOTS), memory_mb=SLOTS * 1024))]

    def launch(self, ctx: Any, launch: Launch) -> dict[str, Any]:
        self.launched.append(launch)
        if self.on_launch is not None:
            self.on_launch(launch)
        return {"name": launch.job_id}

    def observe(self, ctx: Any, refs: Mapping[str, Mapping[str, Any]]) -> dict[str, Observation]:
        return {
            job_id: Observation(
                job_id=job_id,
                state="finished",
                status=JobStatus.SUCCEEDED,
                exit_code=0,
                message="exited with code 0",
            )
            for job_id in refs
            if job_id in self.done
        }

    def stop(
        self, ctx: Any, job_id: str, ref: Mapping[str, Any], *, reason: StopReason, grace_s: float
    ) -> None:
        self.stopped.append((job_id, reason))

    def read_logs(
        self, ctx: Any, job_id: str, ref: Mapping[str, Any] | None, *, offset: int, limit: int
    ) -> tuple[bytes, int]:
        return b"", 0


@pytest.fixture
def served(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Context]:
    """A home as a server sees it (a server URL, so jobs get tokens; submits only queue and
    wake the background pipeline), on the batch executor."""
    yield from _served(settings, monkeypatch)


def _served(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Context]:
    monkeypatch.setitem(wiring.EXECUTORS, "batch", f"{__name__}:BatchExecutor")
    context = open_context(
        dataclasses.replace(settings, executor="batch", server_url="http://127.0.0.1:1"),
        actor="tester",
    )
    admission.background(True)
    try:
        yield context
    finally:
        admission.background(False)
        wiring.close_executors()
        forget_database(settings.database_url)


def runner(ctx: Context) -> BatchExecutor:
    found = wiring.open_executor(ctx.settings.executor, ctx.settings)
    assert isinstance(found, BatchExecutor)
    return found


def submit(ctx: Context, n: int) -> list[str]:
    spec = JobSpec(command=[sys.executable, "-c", "pass"], resources=Resources(cpus=1))
    return [jobs.submit_job(ctx, project="p", spec=spec).id for _ in range(n)]


@contextlib.contextmanager
def write_transactions(ctx: Context) -> Iterator[list[str]]:
    """Collects every write transaction begun inside it (SQLite: BEGIN IMMEDIATE)."""
    seen: list[str] = []

    def listen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.strip().upper() == "BEGIN IMMEDIATE":
            seen.append(statement)

    event.listen(ctx.db.engine, "before_cursor_execute", listen)
    try:
        yield seen
    finally:
        event.remove(ctx.db.engine, "before_cursor_execute", listen)


def status_of(ctx: Context, job_id: str) -> JobStatus:
    return jobs.get_job(ctx, job_id=job_id).status


def test_a_step_writes_as_many_transactions_for_thirty_jobs_as_for_one(served: Context) -> None:
    counts: dict[int, tuple[int, int]] = {}
    for n in (1, 30):
        ids = submit(served, n)
        with write_transactions(served) as admitting:
            admission.step(served)  # decide + admit + tokens; launch; store the references
        assert all(status_of(served, j) is JobStatus.RUNNING for j in ids)
        runner(served).done.update(ids)
        with write_transactions(served) as finishing:
            admission.step(served)  # the look finds them finished: one transaction ends them
        assert all(status_of(served, j) is JobStatus.SUCCEEDED for j in ids)
        counts[n] = (len(admitting), len(finishing))
    assert counts[30] == counts[1], counts
    assert counts[1][0] <= 2 and counts[1][1] <= 1, counts


def test_every_change_is_audited_and_the_chain_verifies(served: Context) -> None:
    _every_change_is_audited(served)


@pytest.mark.slow
def test_every_change_is_audited_and_the_chain_verifies_on_postgresql(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = create_database(postgres_url)
    settings = Settings(home=tmp_path / "pg-home", db_url=url)
    try:
        for context in _served(settings, monkeypatch):
            _every_change_is_audited(context)
    finally:
        drop_database(url)


def _every_change_is_audited(ctx: Context) -> None:
    ids = submit(ctx, 40)
    admission.step(ctx)
    runner(ctx).done.update(ids)
    admission.step(ctx)
    assert {status_of(ctx, j) for j in ids} == {JobStatus.SUCCEEDED}
    with ctx.db.read() as s:
        events = list_events(s, limit=10_000)
        report = verify(s)
    assert report.ok, report
    per_job: dict[str, Counter[str]] = {j: Counter() for j in ids}
    for e in events:
        job_id = (e.details or {}).get("job_id") or e.resource.rsplit("/", 1)[-1]
        if job_id in per_job:
            per_job[job_id][e.action] += 1
    for job_id, actions in per_job.items():
        assert set(actions) >= JOB_EVENTS, (job_id, actions)
        assert all(count == 1 for count in actions.values()), (job_id, actions)
    revoked = [e for e in events if e.action == "token.revoke_job"]
    assert sorted(e.resource for e in revoked) == sorted(f"job/{j}" for j in ids)
    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_a_reference_is_stored_only_while_the_lease_is_ours(served: Context) -> None:
    ids = submit(served, 3)
    taken = ids[1]

    def take_over(launch: Launch) -> None:  # another process took this job's lease meanwhile
        if launch.job_id == taken:
            with served.db.transaction() as s:
                stored = s.get(JobRow, taken)
                assert stored is not None
                stored.lock_token = "another-process"

    runner(served).on_launch = take_over
    result = admission.step(served)
    assert sorted(result.launched) == sorted(j for j in ids if j != taken)
    with served.db.read() as s:
        refs = dict(s.execute(select(JobRow.id, JobRow.executor_ref)).all())
    assert refs[taken] is None, "not ours: left to the lease's holder"
    assert all(refs[j] == {"name": j} for j in ids if j != taken)


def test_a_cancel_during_a_batch_of_launches_stops_that_job_only(served: Context) -> None:
    ids = submit(served, 4)
    cancelled = ids[2]

    def cancel_meanwhile(launch: Launch) -> None:  # what cancel_job does before the ref exists
        if launch.job_id == cancelled:
            with served.db.transaction() as s:
                stored = s.get(JobRow, cancelled)
                assert stored is not None and not stored.executor_ref
                stored.cancel_requested = True

    runner(served).on_launch = cancel_meanwhile
    admission.step(served)
    assert runner(served).stopped == [(cancelled, "cancel")]


def test_finished_jobs_free_their_capacity_in_the_same_step(served: Context) -> None:
    first = submit(served, SLOTS)
    admission.step(served)
    second = submit(served, SLOTS)
    admission.step(served)
    assert {status_of(served, j) for j in second} == {JobStatus.QUEUED}, "the node is full"
    runner(served).done.update(first)
    result = admission.step(served)
    assert sorted(result.finished) == sorted(first)
    assert sorted(result.admitted) == sorted(second), "admitted on the capacity just freed"


def test_a_step_that_admits_while_jobs_wait_asks_for_another_at_once(served: Context) -> None:
    submit(served, SLOTS + 5)
    admission.WAKE.clear()
    admission.step(served)
    assert admission.WAKE.is_set(), "admitted 64 while 5 wait: step again at once"
    admission.WAKE.clear()
    result = admission.step(served)  # the node is full: nothing admitted
    assert not result.admitted and result.waiting == 5
    assert not admission.WAKE.is_set(), "a step that admits nothing does not loop"
