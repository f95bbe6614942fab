"""month_shards: the shards of a sharded month close

Revision ID: 0004
Revises: 0003

`month-end --shard I/N` writes the drafts of one shard of accounts and records
here which run wrote them and whether it completed; `month-end --finalize`
finalizes the month only when every shard of one split is complete.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "month_shards",
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("shard_count", sa.Integer(), nullable=False),
        sa.Column("shard_index", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("settings_hash", sa.String(length=64), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("invoices", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("period", "shard_count", "shard_index", name=op.f("pk_month_shards")),
    )


def downgrade() -> None:
    op.drop_table("month_shards")
