"""domain.jobs: the job state machine allows exactly the documented transitions."""

from __future__ import annotations

import itertools

import pytest

from shipyard.domain.jobs import TRANSITIONS, check_transition
from shipyard.domain.models import FINISHED_JOB_STATUSES, JobStatus
from shipyard.errors import InvalidStateError

S = JobStatus
ALLOWED = {
    (S.QUEUED, S.RUNNING),
    (S.QUEUED, S.CANCELLED),
    (S.QUEUED, S.FAILED),
    (S.RUNNING, S.SUCCEEDED),
    (S.RUNNING, S.FAILED),
    (S.RUNNING, S.CANCELLED),
    (S.RUNNING, S.TIMED_OUT),
    (S.RUNNING, S.QUEUED),  # requeued after a preemption or a lost node
}
ALL_PAIRS = list(itertools.product(JobStatus, JobStatus))


def test_every_status_has_a_row() -> None:
    assert set(TRANSITIONS) == set(JobStatus)


@pytest.mark.parametrize(("current", "target"), sorted(ALLOWED), ids=lambda s: s.value)
def test_allowed_transitions_pass(current: JobStatus, target: JobStatus) -> None:
    check_transition(current, target, job_id="job1")


@pytest.mark.parametrize(
    ("current", "target"), [p for p in ALL_PAIRS if p not in ALLOWED], ids=lambda s: s.value
)
def test_every_other_transition_is_an_invalid_state(current: JobStatus, target: JobStatus) -> None:
    with pytest.raises(InvalidStateError) as caught:
        check_transition(current, target, job_id="job1")
    assert caught.value.field == "status"
    assert "job1" in caught.value.message
    assert current.value in caught.value.message and target.value in caught.value.message
    assert caught.value.code == "invalid_state" and caught.value.http_status == 409


@pytest.mark.parametrize("status", list(JobStatus), ids=lambda s: s.value)
def test_finished_statuses_are_exactly_the_terminal_ones(status: JobStatus) -> None:
    assert status.finished == (status in FINISHED_JOB_STATUSES) == (not TRANSITIONS[status])
