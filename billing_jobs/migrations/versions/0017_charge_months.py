"""charge_months: the months that may hold stored charges

Revision ID: 0017
Revises: 0016

A run writes its month's row before it writes any period of that month, so a month
without a row holds none: its first night or first close does not look stored
periods up (at 1M projects, 10,000 primary-key lookups a chunk that find nothing).
This revision creates the table and adds a row for every month that already holds
periods, in the migration's one transaction (a kill rolls it back; a re-run starts
over). Downgrade drops the table.
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from billing_jobs import faults

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

_PERIODS = sa.table("charge_periods", sa.column("first_day", sa.Date))
_MONTHS = sa.table(
    "charge_months",
    sa.column("period", sa.String),
    sa.column("run_id", sa.String),
    sa.column("recorded_at", sa.DateTime),
)


def upgrade() -> None:
    op.create_table(
        "charge_months",
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("recorded_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("period", name=op.f("pk_charge_months")),
    )
    conn = op.get_bind()
    first_day = _PERIODS.c.first_day
    # The month as text whatever the server's date style: to_char on PostgreSQL; SQLite
    # stores dates as ISO text.
    month = (
        sa.func.to_char(first_day, "YYYY-MM")
        if conn.dialect.name == "postgresql"
        else sa.func.substr(first_day, 1, 7)
    )
    held = sa.select(month.label("period")).distinct().subquery()
    now = datetime.now(UTC).replace(tzinfo=None)
    conn.execute(
        _MONTHS.insert().from_select(
            ["period", "run_id", "recorded_at"],
            sa.select(held.c.period, sa.literal("db-upgrade-0017"), sa.literal(now, sa.DateTime)),
        )
    )
    faults.in_migration(revision)


def downgrade() -> None:
    op.drop_table("charge_months")
