"""initial billing tables

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "billed_days",
        sa.Column("billing_day", sa.Date(), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("billed_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("billing_day", name=op.f("pk_billed_days")),
    )
    op.create_table(
        "billing_locks",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("acquired_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_billing_locks")),
    )
    op.create_table(
        "billing_runs",
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("job", sa.String(length=32), nullable=False),
        sa.Column("arguments", sa.Text(), nullable=False),
        sa.Column("period", sa.String(length=32), nullable=False),
        sa.Column("settings_hash", sa.String(length=64), nullable=False),
        sa.Column("code_version", sa.String(length=32), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("counts", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_billing_runs")),
    )
    with op.batch_alter_table("billing_runs", schema=None) as batch_op:
        batch_op.create_index("ix_billing_runs_job_started", ["job", "started_at"], unique=False)

    op.create_table(
        "daily_charges",
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("charge_type", sa.String(length=32), nullable=False),
        sa.Column("charge_date", sa.Date(), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("quantity_units", sa.BigInteger(), nullable=False),
        sa.Column("amount_units", sa.BigInteger(), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("recorded_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("project_id", "charge_type", "charge_date", name=op.f("pk_daily_charges")),
    )
    with op.batch_alter_table("daily_charges", schema=None) as batch_op:
        batch_op.create_index("ix_daily_charges_charge_date", ["charge_date"], unique=False)

    op.create_table(
        "invoices",
        sa.Column("invoice_id", sa.String(length=128), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("total_units", sa.BigInteger(), nullable=False),
        sa.Column("line_count", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("finalized_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("invoice_id", name=op.f("pk_invoices")),
        sa.UniqueConstraint("account_id", "period", "kind", "sequence", name=op.f("uq_invoices_account_id")),
    )
    with op.batch_alter_table("invoices", schema=None) as batch_op:
        batch_op.create_index("ix_invoices_period_status", ["period", "status"], unique=False)

    op.create_table(
        "month_closes",
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("closed_at", sa.DateTime(), nullable=False),
        sa.Column("close_run_id", sa.String(length=36), nullable=False),
        sa.Column("last_run_id", sa.String(length=36), nullable=False),
        sa.Column("last_run_at", sa.DateTime(), nullable=False),
        sa.Column("adjustments", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("period", name=op.f("pk_month_closes")),
    )
    op.create_table(
        "rejects",
        sa.Column("source_table", sa.String(length=32), nullable=False),
        sa.Column("source_id", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=64), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=True),
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("first_run_id", sa.String(length=36), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.PrimaryKeyConstraint("source_table", "source_id", "reason", name=op.f("pk_rejects")),
    )
    with op.batch_alter_table("rejects", schema=None) as batch_op:
        batch_op.create_index("ix_rejects_period", ["period"], unique=False)

    op.create_table(
        "invoice_lines",
        sa.Column("invoice_id", sa.String(length=128), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("line_type", sa.String(length=32), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("quantity_units", sa.BigInteger(), nullable=False),
        sa.Column("unit_price", sa.String(length=32), nullable=False),
        sa.Column("amount_units", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["invoice_id"],
            ["invoices.invoice_id"],
            name=op.f("fk_invoice_lines_invoice_id_invoices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("invoice_id", "project_id", "line_type", name=op.f("pk_invoice_lines")),
    )
    with op.batch_alter_table("invoice_lines", schema=None) as batch_op:
        batch_op.create_index("ix_invoice_lines_period_account", ["period", "account_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("invoice_lines", schema=None) as batch_op:
        batch_op.drop_index("ix_invoice_lines_period_account")

    op.drop_table("invoice_lines")
    with op.batch_alter_table("rejects", schema=None) as batch_op:
        batch_op.drop_index("ix_rejects_period")

    op.drop_table("rejects")
    op.drop_table("month_closes")
    with op.batch_alter_table("invoices", schema=None) as batch_op:
        batch_op.drop_index("ix_invoices_period_status")

    op.drop_table("invoices")
    with op.batch_alter_table("daily_charges", schema=None) as batch_op:
        batch_op.drop_index("ix_daily_charges_charge_date")

    op.drop_table("daily_charges")
    with op.batch_alter_table("billing_runs", schema=None) as batch_op:
        batch_op.drop_index("ix_billing_runs_job_started")

    op.drop_table("billing_runs")
    op.drop_table("billing_locks")
    op.drop_table("billed_days")
