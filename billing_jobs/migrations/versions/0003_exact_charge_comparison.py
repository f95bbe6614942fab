"""daily charges compared exactly: charge_totals dropped, charges indexed by account and day

Revision ID: 0003
Revises: 0002

Runs compare the stored daily charges with the recomputed ones row by row on their
natural key, in the database, so the per-project sums of `charge_totals` (which
could agree while the days differ) are no longer kept. A chunk's stored charges are
found through `(account_id, charge_date)`, which replaces the index on `charge_date`
alone (no query reads charges by day for every account).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("charge_totals", schema=None) as batch_op:
        batch_op.drop_index("ix_charge_totals_period_account")
    op.drop_table("charge_totals")
    with op.batch_alter_table("daily_charges", schema=None) as batch_op:
        batch_op.drop_index("ix_daily_charges_charge_date")
        batch_op.create_index("ix_daily_charges_account_date", ["account_id", "charge_date"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("daily_charges", schema=None) as batch_op:
        batch_op.drop_index("ix_daily_charges_account_date")
        batch_op.create_index("ix_daily_charges_charge_date", ["charge_date"], unique=False)
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
