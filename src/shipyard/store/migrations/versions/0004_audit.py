"""audit: keyed chain

Revision ID: 0004
Revises: 0003

No schema change: the keyed chain (HMAC-SHA256, ``security.audit``) stores its hashes in the same
64-character ``hash`` column, and what tells old events from new ones lives outside the database,
on purpose (anyone who can write the database could rewrite a marker kept in it):

* events written before this version were hashed with plain SHA-256 and keep those hashes;
* the first process that uses the chain after the upgrade creates the key file
  (``$SHIPYARD_HOME/keys/audit.key``) and records in it the seq and hash of the chain's tail at
  that moment (``legacy_through``, ``legacy_hash``), plus the first head anchor;
* ``verify`` checks events up to ``legacy_through`` with the unkeyed formula, pins the last of them
  to the recorded hash, and requires an HMAC on every later event.

So old events are trusted as they were when the key was made (trust on first use) and cannot be
altered afterwards; nothing is re-hashed, and downgrading needs nothing either.
"""

import sqlalchemy as sa  # noqa: F401
from alembic import op  # noqa: F401

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
