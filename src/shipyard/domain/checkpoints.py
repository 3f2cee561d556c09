"""A checkpoint of a run: a file or a folder stored content-addressed, with its step and attempt."""

from __future__ import annotations

from datetime import datetime
from enum import Enum

from shipyard.domain.models import FileEntry, Model


class CheckpointKind(str, Enum):
    FILE = "file"  # one file: restored as ``dest/<its name>``
    FOLDER = "folder"  # a folder's files: restored under ``dest``


class Checkpoint(Model):
    id: str
    run_id: str
    project: str
    number: int  # 1, 2, ... in the order the run saved them
    kind: CheckpointKind
    digest: str  # the manifest's blob: the content address of the whole checkpoint
    size: int  # bytes of all its files
    step: int | None
    attempt: int
    created_at: datetime
    files: list[FileEntry]
