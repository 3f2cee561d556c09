"""Datasets (``/projects/{project}/datasets``): thin HTTP over ``shipyard.data.datasets``.

A remote commit is two steps: the client uploads the files' blobs
(``PUT /projects/{project}/blobs/{digest}``, only those the server lacks), then posts the manifest
here; the service checks every path and that every digest names a stored blob of the stated size
before it writes anything.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Response

from shipyard.data import datasets, quality
from shipyard.domain.models import Dataset, DatasetVersion, FileEntry
from shipyard.schemas import CommitDatasetRequest, ErrorBody, TagDatasetRequest
from shipyard.server.deps import PROJECT_PREFIX, Ctx, ProjectPath, name_path

router = APIRouter(
    prefix=f"{PROJECT_PREFIX}/datasets",
    tags=["datasets"],
)

DatasetName = Annotated[str, name_path("The dataset (a name).")]
VersionRef = Annotated[str, name_path("A version number, 'vN', 'latest' or a tag.")]
TagName = Annotated[str, name_path("The tag (a name).")]


@router.get("")
def list_datasets(project: ProjectPath, ctx: Ctx) -> list[Dataset]:
    return datasets.list_datasets(ctx, project=project)


@router.get("/{name}")
def get_dataset(project: ProjectPath, name: DatasetName, ctx: Ctx) -> Dataset:
    return datasets.get_dataset(ctx, project=project, name=name)


@router.post("/{name}/versions", status_code=201, responses={409: {"model": ErrorBody}})
def commit_files(
    project: ProjectPath, name: DatasetName, body: CommitDatasetRequest, ctx: Ctx
) -> DatasetVersion:
    files = [FileEntry(path=f.path, digest=f.digest, size=f.size) for f in body.files]
    checks = quality.load_suite(body.checks) if body.checks is not None else None
    return datasets.commit_files(
        ctx, project=project, name=name, files=files, message=body.message, checks=checks
    )


@router.get("/{name}/versions")
def list_versions(
    project: ProjectPath, name: DatasetName, ctx: Ctx, include_deleted: bool = False
) -> list[DatasetVersion]:
    return datasets.list_versions(ctx, project=project, name=name, include_deleted=include_deleted)


@router.delete("/{name}/versions/{version}", responses={409: {"model": ErrorBody}})
def delete_version(
    project: ProjectPath, name: DatasetName, version: VersionRef, ctx: Ctx
) -> DatasetVersion:
    """Soft-delete a version (``shipyard gc`` reclaims it; until then it can be restored)."""
    return datasets.delete_version(ctx, project=project, name=name, version=version)


@router.post("/{name}/versions/{version}/restore", responses={409: {"model": ErrorBody}})
def restore_version(
    project: ProjectPath, name: DatasetName, version: VersionRef, ctx: Ctx
) -> DatasetVersion:
    return datasets.restore_version(ctx, project=project, name=name, version=version)


@router.put("/{name}/tags/{tag}", responses={409: {"model": ErrorBody}})
def tag_version(
    project: ProjectPath, name: DatasetName, tag: TagName, body: TagDatasetRequest, ctx: Ctx
) -> DatasetVersion:
    return datasets.tag_version(
        ctx, project=project, name=name, version=body.version, tag=tag, force=body.force
    )


@router.delete("/{name}/tags/{tag}", status_code=204, response_class=Response)
def untag(project: ProjectPath, name: DatasetName, tag: TagName, ctx: Ctx) -> None:
    datasets.untag(ctx, project=project, name=name, tag=tag)


@router.get("/{name}/versions/{version}")
def get_version(
    project: ProjectPath, name: DatasetName, version: VersionRef, ctx: Ctx
) -> DatasetVersion:
    return datasets.get_version(ctx, project=project, name=name, version=version)


@router.get("/{name}/versions/{version}/files")
def list_files(
    project: ProjectPath, name: DatasetName, version: VersionRef, ctx: Ctx
) -> list[FileEntry]:
    return datasets.list_files(ctx, project=project, name=name, version=version)
