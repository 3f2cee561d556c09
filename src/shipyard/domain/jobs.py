"""The job state machine: which transitions are allowed."""

from __future__ import annotations

from shipyard.domain.models import JobStatus
from shipyard.errors import InvalidStateError

TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED}),
    # RUNNING -> QUEUED: requeued after a preemption, or a lost node of a preemptible job.
    JobStatus.RUNNING: frozenset(
        {
            JobStatus.SUCCEEDED,
            JobStatus.FAILED,
            JobStatus.CANCELLED,
            JobStatus.TIMED_OUT,
            JobStatus.QUEUED,
        }
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
    JobStatus.TIMED_OUT: frozenset(),
}


def check_transition(current: JobStatus, target: JobStatus, *, job_id: str) -> None:
    """Raise :class:`InvalidStateError` unless ``current -> target`` is allowed."""
    if target not in TRANSITIONS[current]:
        raise InvalidStateError(
            f"job {job_id} is {current.value}; it cannot become {target.value}",
            field="status",
        )
