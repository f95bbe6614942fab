"""month_reconciles: what `billing-jobs reconcile` found for each closed month

Revision ID: 0009
Revises: 0008

One row per (month, reconcile run): whether the month's finalized invoices still
agree with its source data (recomputed) and with its stored daily charges.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "month_reconciles",
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("checked_at", sa.DateTime(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("differences", sa.Integer(), nullable=False),
        sa.Column("difference_units", sa.BigInteger(), nullable=False),
        sa.Column("recomputed_differences", sa.Integer(), nullable=False),
        sa.Column("stored_differences", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("period", "run_id", name=op.f("pk_month_reconciles")),
    )
    op.create_index(
        "ix_month_reconciles_period_checked", "month_reconciles", ["period", "checked_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_month_reconciles_period_checked", table_name="month_reconciles")
    op.drop_table("month_reconciles")
