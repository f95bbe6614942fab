"""Settings pinned per closed month; months held for finance's approval

Revision ID: 0007
Revises: 0006

`month_closes` records the billing settings a month was closed with (their hash and
values), so a re-close with other settings can name what changed. `month_holds` holds
the drafts of `month-end --hold` (or `[billing] require_approval`) until
`month-end --approve` finalizes them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("month_closes") as batch:
        batch.add_column(sa.Column("settings_hash", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("settings", sa.Text(), nullable=True))
    # Months closed before: the settings hash of the run that last wrote them (values unknown).
    op.execute(
        "UPDATE month_closes SET settings_hash = "
        "(SELECT r.settings_hash FROM billing_runs r WHERE r.run_id = month_closes.last_run_id)"
    )
    op.create_table(
        "month_holds",
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("settings_hash", sa.String(length=64), nullable=False),
        sa.Column("held_at", sa.DateTime(), nullable=False),
        sa.Column("invoices", sa.Integer(), nullable=False),
        sa.Column("total_units", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("period", name=op.f("pk_month_holds")),
    )


def downgrade() -> None:
    op.drop_table("month_holds")
    with op.batch_alter_table("month_closes") as batch:
        batch.drop_column("settings")
        batch.drop_column("settings_hash")
