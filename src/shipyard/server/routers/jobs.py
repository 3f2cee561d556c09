"""Jobs (``/projects/{project}/jobs``): thin HTTP over ``shipyard.compute.jobs``.

By-id routes carry the project too: a job of another project is a 404, like a missing one.
"""

from __future__ import annotations

import codecs
from typing import Annotated

from fastapi import APIRouter, Query

from shipyard.compute import jobs
from shipyard.domain.models import Job, JobStatus
from shipyard.schemas import MAX_INT64, ErrorBody, JobLogsResponse, SubmitJobRequest
from shipyard.server.deps import PROJECT_PREFIX, Ctx, ProjectPath, name_path

router = APIRouter(
    prefix=f"{PROJECT_PREFIX}/jobs",
    tags=["jobs"],
)

JobId = Annotated[str, name_path("The job's id.")]


@router.post("", status_code=201)
def submit_job(project: ProjectPath, body: SubmitJobRequest, ctx: Ctx) -> Job:
    return jobs.submit_job(
        ctx, project=project, spec=body.spec, run_id=body.run_id, code_digest=body.code_digest
    )


@router.get("")
def list_jobs(project: ProjectPath, ctx: Ctx, status: JobStatus | None = None) -> list[Job]:
    return jobs.list_jobs(ctx, project=project, status=status)


@router.get("/{job_id}")
def get_job(project: ProjectPath, job_id: JobId, ctx: Ctx) -> Job:
    return jobs.get_job(ctx, job_id=job_id, project=project)


@router.post("/{job_id}/cancel", responses={409: {"model": ErrorBody}})
def cancel_job(project: ProjectPath, job_id: JobId, ctx: Ctx) -> Job:
    return jobs.cancel_job(ctx, job_id=job_id, project=project)


@router.get("/{job_id}/logs")
def read_logs(
    project: ProjectPath,
    job_id: JobId,
    ctx: Ctx,
    offset: Annotated[int, Query(ge=0, le=MAX_INT64, description="A byte offset.")] = 0,
) -> JobLogsResponse:
    data, new_offset, finished = jobs.read_logs(ctx, job_id=job_id, project=project, offset=offset)
    # A character cut at the end of this chunk is held back and sent whole next time.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text = decoder.decode(data, final=finished)
    held_back = len(decoder.getstate()[0])
    return JobLogsResponse(data=text, offset=new_offset - held_back, finished=finished)
