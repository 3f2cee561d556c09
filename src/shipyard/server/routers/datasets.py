"""Datasets (``/datasets``): thin HTTP over ``shipyard.data.datasets``.

A remote commit is two steps: the client uploads the files' blobs (``PUT /blobs/{digest}``, only
those the server lacks), then posts the manifest here; the service checks every path and that
every digest names a stored blob of the stated size before it writes anything.
"""

from __future__ import annotations

from fastapi import APIRouter

from shipyard.data import datasets
from shipyard.domain.models import Dataset, DatasetVersion, FileEntry
from shipyard.schemas import CommitDatasetRequest
from shipyard.server.deps import API_PREFIX, DEFAULT_PROJECT, Ctx, Project

router = APIRouter(prefix=f"{API_PREFIX}/datasets", tags=["datasets"])


@router.get("")
def list_datasets(ctx: Ctx, project: Project = DEFAULT_PROJECT) -> list[Dataset]:
    return datasets.list_datasets(ctx, project=project)


@router.get("/{name}")
def get_dataset(name: str, ctx: Ctx, project: Project = DEFAULT_PROJECT) -> Dataset:
    return datasets.get_dataset(ctx, project=project, name=name)


@router.post("/{name}/versions", status_code=201)
def commit_files(name: str, body: CommitDatasetRequest, ctx: Ctx) -> DatasetVersion:
    return datasets.commit_files(
        ctx, project=body.project, name=name, files=body.files, message=body.message
    )


@router.get("/{name}/versions")
def list_versions(name: str, ctx: Ctx, project: Project = DEFAULT_PROJECT) -> list[DatasetVersion]:
    return datasets.list_versions(ctx, project=project, name=name)


@router.get("/{name}/versions/{version}")
def get_version(
    name: str, version: str, ctx: Ctx, project: Project = DEFAULT_PROJECT
) -> DatasetVersion:
    return datasets.get_version(ctx, project=project, name=name, version=version)


@router.get("/{name}/versions/{version}/files")
def list_files(
    name: str, version: str, ctx: Ctx, project: Project = DEFAULT_PROJECT
) -> list[FileEntry]:
    return datasets.list_files(ctx, project=project, name=name, version=version)
