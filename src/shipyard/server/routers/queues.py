"""Queues (``/queues``): quotas, cohorts and weights; usage, borrowed capacity, waiting jobs.

Thin HTTP over ``shipyard.compute.queues``: anyone signed in may read them, server admins
configure them (``PUT``) and remove a configuration (``DELETE``: the queue is unlimited again).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Response
from pydantic import Field

from shipyard.compute import queues
from shipyard.domain.models import QueueView, QuotaSpec
from shipyard.schemas import ErrorBody, Name, Request
from shipyard.server.deps import API_PREFIX, Ctx, name_path

router = APIRouter(
    prefix=f"{API_PREFIX}/queues",
    tags=["queues"],
    responses={
        403: {"model": ErrorBody},
        404: {"model": ErrorBody},
        422: {"model": ErrorBody},
    },
)

QueueName = Annotated[str, name_path("The queue's name (a project's own queue is named like it).")]
ModelName = Annotated[str, Field(min_length=1, max_length=queues.MAX_MODEL_LEN)]
Gpus = Annotated[float, Field(ge=0, le=queues.MAX_GPUS)]


class QuotaBody(Request):
    """A quota; a field left out (or null) is unlimited."""

    gpus: Gpus | None = None
    cpus: float | None = Field(default=None, ge=0, le=queues.MAX_CPUS)
    memory_mb: int | None = Field(default=None, ge=0, le=queues.MAX_MEMORY_MB)
    gpus_by_model: dict[ModelName, Gpus] = Field(default_factory=dict, max_length=queues.MAX_MODELS)

    def spec(self) -> QuotaSpec:
        return QuotaSpec(
            gpus=self.gpus,
            cpus=self.cpus,
            memory_mb=self.memory_mb,
            gpus_by_model=dict(self.gpus_by_model),
        )


class SetQueueRequest(Request):
    nominal: QuotaBody = Field(default_factory=QuotaBody)
    cohort: Name | None = None
    borrowing_limit: QuotaBody = Field(default_factory=QuotaBody)
    weight: float = Field(default=1.0, gt=0, le=queues.MAX_WEIGHT)


@router.get("")
def list_queues(ctx: Ctx) -> list[QueueView]:
    return queues.list_queues(ctx)


@router.get("/{name}")
def get_queue(name: QueueName, ctx: Ctx) -> QueueView:
    return queues.get_queue(ctx, name=name)


@router.put("/{name}")
def set_queue(name: QueueName, body: SetQueueRequest, ctx: Ctx) -> QueueView:
    return queues.set_queue(
        ctx,
        name=name,
        nominal=body.nominal.spec(),
        cohort=body.cohort,
        borrowing_limit=body.borrowing_limit.spec(),
        weight=body.weight,
    )


@router.delete("/{name}", status_code=204, response_class=Response)
def delete_queue(name: QueueName, ctx: Ctx) -> None:
    queues.delete_queue(ctx, name=name)
