"""credit_entries: an index on recorded_at

Revision ID: 0011
Revises: 0010

The ledger's last write publishes the entries written so far with the newest
`recorded_at`, and the readers compare with that stamp: with the index, finding it
reads one index entry instead of every entry of the ledger's history.
"""

from __future__ import annotations

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_credit_entries_recorded_at", "credit_entries", ["recorded_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_credit_entries_recorded_at", table_name="credit_entries")
