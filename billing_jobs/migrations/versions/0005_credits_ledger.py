"""credits ledger: lots, entries, balances, written periods, refunds, replay inputs

Revision ID: 0005
Revises: 0004

The book of record of prepaid credits (credits.md): month-end writes it after the
month's invoices. Entries are immutable; corrections are further entries.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "credit_lots",
        sa.Column("lot_id", sa.String(length=128), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("credit_units", sa.BigInteger(), nullable=False),
        sa.Column("money_cents", sa.BigInteger(), nullable=False),
        sa.Column("paid_at", sa.DateTime(), nullable=False),
        sa.Column("valid_from", sa.Date(), nullable=False),
        sa.Column("valid_until", sa.Date(), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("lot_id", name=op.f("pk_credit_lots")),
    )
    op.create_index("ix_credit_lots_account", "credit_lots", ["account_id"])
    op.create_table(
        "credit_entries",
        sa.Column("entry_id", sa.String(length=40), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("lot_id", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("cause", sa.String(length=16), nullable=False),
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("corrects", sa.String(length=7), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("credit_units", sa.BigInteger(), nullable=False),
        sa.Column("money_cents", sa.BigInteger(), nullable=True),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("recorded_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("entry_id", name=op.f("pk_credit_entries")),
        sa.UniqueConstraint(
            "account_id",
            "lot_id",
            "kind",
            "day",
            "cause",
            "period",
            "corrects",
            "revision",
            name=op.f("uq_credit_entries_account_id"),
        ),
    )
    op.create_index("ix_credit_entries_period", "credit_entries", ["period"])
    op.create_table(
        "credit_balances",
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("held_units", sa.BigInteger(), nullable=False),
        sa.Column("arrears_units", sa.BigInteger(), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.PrimaryKeyConstraint("account_id", "period", name=op.f("pk_credit_balances")),
    )
    op.create_table(
        "credit_periods",
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("written_at", sa.DateTime(), nullable=False),
        sa.Column("last_run_id", sa.String(length=36), nullable=False),
        sa.Column("last_written_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("period", name=op.f("pk_credit_periods")),
    )
    op.create_table(
        "credit_refunds",
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("lot_id", sa.String(length=128), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("credit_units", sa.BigInteger(), nullable=False),
        sa.Column("money_cents", sa.BigInteger(), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("written_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("request_id", "lot_id", name=op.f("pk_credit_refunds")),
    )

    op.create_table(
        "credit_inputs",
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("day", sa.BigInteger(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("credit_units", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("account_id", "day", "source", name=op.f("pk_credit_inputs")),
    )


def downgrade() -> None:
    op.drop_table("credit_inputs")
    op.drop_table("credit_refunds")
    op.drop_table("credit_periods")
    op.drop_table("credit_balances")
    op.drop_index("ix_credit_entries_period", table_name="credit_entries")
    op.drop_table("credit_entries")
    op.drop_index("ix_credit_lots_account", table_name="credit_lots")
    op.drop_table("credit_lots")
