"""charge totals per project and month

Revision ID: 0002
Revises: 0001

`charge_totals` holds, per (project, charge type, month), the sums of the daily
charges; month close compares these instead of aggregating every daily charge.
The upgrade fills it from the charges already written.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "charge_totals",
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("charge_type", sa.String(length=32), nullable=False),
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.Column("dw", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("project_id", "charge_type", "period", name=op.f("pk_charge_totals")),
    )
    with op.batch_alter_table("charge_totals", schema=None) as batch_op:
        batch_op.create_index("ix_charge_totals_period_account", ["period", "account_id"], unique=False)

    if op.get_bind().dialect.name == "postgresql":
        period, day = "to_char(charge_date, 'YYYY-MM')", "EXTRACT(day FROM charge_date)"
    else:
        period, day = "strftime('%Y-%m', charge_date)", "CAST(strftime('%d', charge_date) AS INTEGER)"
    op.execute(
        "INSERT INTO charge_totals (project_id, charge_type, period, account_id, n, amount, quantity, dw)"
        f" SELECT project_id, charge_type, {period}, account_id, COUNT(*), SUM(amount_units),"
        f" SUM(quantity_units), SUM({day} * (amount_units % 1000003))"
        f" FROM daily_charges GROUP BY project_id, charge_type, {period}, account_id"
    )


def downgrade() -> None:
    with op.batch_alter_table("charge_totals", schema=None) as batch_op:
        batch_op.drop_index("ix_charge_totals_period_account")
    op.drop_table("charge_totals")
