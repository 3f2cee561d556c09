"""What every service call needs: settings, the metadata database, the blob store, the caller.

Built by factories (``open_context``) - the server's app factory, or the SDK in embedded mode - and
passed to services as their first argument. Cheap to copy with another caller: ``principal`` is
who is calling (services authorise it with ``security.rbac.authorize``), ``actor`` the name audit
events record (derived from the principal by ``as_principal``; ``as_actor`` renames only).
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass

from shipyard.blobs import BlobStore, open_blobs
from shipyard.domain.principals import LOCAL_PRINCIPAL, Principal
from shipyard.settings import Settings
from shipyard.store import Database, open_database


@dataclass(frozen=True, kw_only=True)
class Context:
    settings: Settings
    db: Database
    blobs: BlobStore
    actor: str = "local"
    principal: Principal = LOCAL_PRINCIPAL

    def as_actor(self, actor: str) -> Context:
        """The same caller under another audit name (e.g. ``system:scheduler``)."""
        return dataclasses.replace(self, actor=actor)

    def as_principal(self, principal: Principal) -> Context:
        """Act as ``principal``; the audit name follows it (``user:alice``, ``job:<id>``)."""
        return dataclasses.replace(self, principal=principal, actor=principal.actor)


def open_context(settings: Settings, *, actor: str = "local") -> Context:
    settings.home.mkdir(parents=True, exist_ok=True)
    db = open_database(settings.database_url)
    # the audit chain's key and head anchor live outside the database (security.audit reads them)
    db.info.setdefault("audit_files", (settings.audit_key_path, settings.audit_head_path))
    return Context(
        settings=settings,
        db=db,
        blobs=open_blobs(settings.blob_url),
        actor=actor,
    )


def new_id() -> str:
    return uuid.uuid4().hex[:16]
