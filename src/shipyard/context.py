"""What every service call needs: settings, the metadata database, the blob store, the actor.

Built by factories (``open_context``) - the server's app factory, or the SDK in embedded mode - and
passed to services as their first argument. Cheap to copy with another actor.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass

from shipyard.blobs import BlobStore, open_blobs
from shipyard.settings import Settings
from shipyard.store import Database, open_database


@dataclass(frozen=True, kw_only=True)
class Context:
    settings: Settings
    db: Database
    blobs: BlobStore
    actor: str = "local"

    def as_actor(self, actor: str) -> Context:
        return dataclasses.replace(self, actor=actor)


def open_context(settings: Settings, *, actor: str = "local") -> Context:
    settings.home.mkdir(parents=True, exist_ok=True)
    return Context(
        settings=settings,
        db=open_database(settings.database_url),
        blobs=open_blobs(settings.blob_url),
        actor=actor,
    )


def new_id() -> str:
    return uuid.uuid4().hex[:16]
