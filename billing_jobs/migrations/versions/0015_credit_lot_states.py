"""credit_lot_states: the state the entries give at the end of each written period

Revision ID: 0015
Revises: 0014

A month-end continues each account from its state at the end of the last written
period (and, for an account whose late data it replays, at the end of the settled
periods). That state was each living lot's entries summed since the lot was funded:
with a year of validity the read grew with every month of history. The ledger's
write now also stores the state it leaves at its period's end, one row per account
and living lot; a later month-end reads those rows and the entries of the days after
them. Nothing is filled in here: an account without rows is read from its entries as
before, and the next month-end stores its state.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "credit_lot_states",
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("lot_id", sa.String(length=128), nullable=False),
        sa.Column("held_units", sa.BigInteger(), nullable=True),
        sa.Column("drawn_units", sa.BigInteger(), nullable=False),
        sa.Column("funded_units", sa.BigInteger(), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.PrimaryKeyConstraint("account_id", "period", "lot_id", name=op.f("pk_credit_lot_states")),
    )


def downgrade() -> None:
    op.drop_table("credit_lot_states")
