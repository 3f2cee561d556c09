"""Jobs (``/jobs``): thin HTTP over ``shipyard.compute.jobs``."""

from __future__ import annotations

import codecs
from typing import Annotated

from fastapi import APIRouter, Query

from shipyard.compute import jobs
from shipyard.domain.models import Job, JobStatus
from shipyard.schemas import JobLogsResponse, SubmitJobRequest
from shipyard.server.deps import API_PREFIX, Ctx, OptionalProject

router = APIRouter(prefix=f"{API_PREFIX}/jobs", tags=["jobs"])


@router.post("", status_code=201)
def submit_job(body: SubmitJobRequest, ctx: Ctx) -> Job:
    return jobs.submit_job(
        ctx, project=body.project, spec=body.spec, run_id=body.run_id, code_digest=body.code_digest
    )


@router.get("")
def list_jobs(
    ctx: Ctx, project: OptionalProject = None, status: JobStatus | None = None
) -> list[Job]:
    return jobs.list_jobs(ctx, project=project, status=status)


@router.get("/{job_id}")
def get_job(job_id: str, ctx: Ctx) -> Job:
    return jobs.get_job(ctx, job_id=job_id)


@router.post("/{job_id}/cancel")
def cancel_job(job_id: str, ctx: Ctx) -> Job:
    return jobs.cancel_job(ctx, job_id=job_id)


@router.get("/{job_id}/logs")
def read_logs(job_id: str, ctx: Ctx, offset: Annotated[int, Query(ge=0)] = 0) -> JobLogsResponse:
    data, new_offset, finished = jobs.read_logs(ctx, job_id=job_id, offset=offset)
    # A character cut at the end of this chunk is held back and sent whole next time.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text = decoder.decode(data, final=finished)
    held_back = len(decoder.getstate()[0])
    return JobLogsResponse(data=text, offset=new_offset - held_back, finished=finished)
