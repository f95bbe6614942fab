"""billing_locks: who holds a lock, and how to tell that its holder died

Revision ID: 0008
Revises: 0007

The writer lock is a session advisory lock on PostgreSQL and a lease renewed by
a heartbeat on SQLite (see `db/lock.py`). `session_pid` names the PostgreSQL
session holding it, `process_key` the holder's process on its host, and
`expires_at` is no longer required (PostgreSQL has no lease).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("billing_locks") as batch:
        batch.alter_column("expires_at", existing_type=sa.DateTime(), nullable=True)
        batch.add_column(sa.Column("process_key", sa.String(length=160), nullable=True))
        batch.add_column(sa.Column("session_pid", sa.Integer(), nullable=True))


def downgrade() -> None:
    # Locks are taken again by the next run; rows of the new kind cannot be kept.
    op.execute("DELETE FROM billing_locks")
    with op.batch_alter_table("billing_locks") as batch:
        batch.drop_column("session_pid")
        batch.drop_column("process_key")
        batch.alter_column("expires_at", existing_type=sa.DateTime(), nullable=False)
