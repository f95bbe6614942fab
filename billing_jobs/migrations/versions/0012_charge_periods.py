"""charge_periods: charges stored as periods instead of one row per project and day

Revision ID: 0012
Revises: 0011

Every run of consecutive days of one month with the same (project, charge type,
account, daily quantity, daily amount) in `daily_charges` becomes one row of
`charge_periods` (its canonical form, `rules.periods`); then `daily_charges` is
dropped. One statement, in the migration's transaction on both back ends: a kill
rolls it back, and a re-run starts over. Downgrade expands the periods back.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from billing_jobs import faults

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

_DAY = {
    "postgresql": "(charge_date - DATE '1970-01-01')",
    "sqlite": "CAST(julianday(charge_date) AS INTEGER)",
}
_MONTH = {"postgresql": "date_trunc('month', charge_date)", "sqlite": "substr(charge_date, 1, 7)"}
_KEY = ("project_id", "charge_type", "first_day")
_VALUES = "project_id, charge_type, account_id, quantity_units, amount_units"


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    # PostgreSQL builds the primary key once, sorted, after the rows are in (an insert
    # into the key per row cost more than the grouping); SQLite cannot add one later.
    key_after = dialect == "postgresql"
    op.create_table(
        "charge_periods",
        sa.Column("project_id", sa.String(64), nullable=False),
        sa.Column("charge_type", sa.String(32), nullable=False),
        sa.Column("first_day", sa.Date(), nullable=False),
        sa.Column("last_day", sa.Date(), nullable=False),
        sa.Column("days", sa.Integer(), nullable=False),
        sa.Column("account_id", sa.String(64), nullable=False),
        sa.Column("quantity_units", sa.BigInteger(), nullable=False),
        sa.Column("amount_units", sa.BigInteger(), nullable=False),
        sa.Column("run_id", sa.String(36), nullable=False),
        sa.Column("recorded_at", sa.DateTime(), nullable=False),
        *([] if key_after else [sa.PrimaryKeyConstraint(*_KEY, name="pk_charge_periods")]),
    )
    day, month = _DAY[dialect], _MONTH[dialect]
    if dialect == "postgresql":
        # Memory for the grouping's sort and the index builds, this transaction only.
        op.execute("SET LOCAL work_mem = '256MB'")
        op.execute("SET LOCAL maintenance_work_mem = '512MB'")
    # Gaps and islands: within one (values, month), consecutive days share day - row_number.
    op.execute(
        "INSERT INTO charge_periods (project_id, charge_type, first_day, last_day, days, account_id,"
        " quantity_units, amount_units, run_id, recorded_at)"
        " SELECT project_id, charge_type, MIN(charge_date), MAX(charge_date), COUNT(*), account_id,"
        " quantity_units, amount_units, MAX(run_id), MAX(recorded_at)"
        f" FROM (SELECT d.*, {month} AS month_of, {day} - ROW_NUMBER() OVER"
        f" (PARTITION BY {_VALUES}, {month} ORDER BY charge_date) AS island FROM daily_charges d) s"
        f" GROUP BY {_VALUES}, month_of, island"
    )
    if key_after:
        op.create_primary_key("pk_charge_periods", "charge_periods", list(_KEY))
    op.create_index("ix_charge_periods_account_first", "charge_periods", ["account_id", "first_day"])
    op.drop_index("ix_daily_charges_account_date", table_name="daily_charges")
    op.drop_table("daily_charges")
    faults.in_migration(revision)


_EXPAND = {
    "postgresql": (
        "SELECT p.project_id, p.charge_type, p.first_day + g.n, p.account_id, p.quantity_units,"
        " p.amount_units, p.run_id, p.recorded_at"
        " FROM charge_periods p CROSS JOIN LATERAL generate_series(0, p.days - 1) AS g(n)"
    ),
    "sqlite": (
        "WITH RECURSIVE g(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM g WHERE n < 30)"
        " SELECT p.project_id, p.charge_type, date(p.first_day, '+' || g.n || ' days'), p.account_id,"
        " p.quantity_units, p.amount_units, p.run_id, p.recorded_at"
        " FROM charge_periods p JOIN g ON g.n < p.days"
    ),
}


def downgrade() -> None:
    op.create_table(
        "daily_charges",
        sa.Column("project_id", sa.String(64), nullable=False),
        sa.Column("charge_type", sa.String(32), nullable=False),
        sa.Column("charge_date", sa.Date(), nullable=False),
        sa.Column("account_id", sa.String(64), nullable=False),
        sa.Column("quantity_units", sa.BigInteger(), nullable=False),
        sa.Column("amount_units", sa.BigInteger(), nullable=False),
        sa.Column("run_id", sa.String(36), nullable=False),
        sa.Column("recorded_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("project_id", "charge_type", "charge_date", name="pk_daily_charges"),
    )
    dialect = op.get_bind().dialect.name
    # Only the days billed: a storage fee stored past the last billed day was not charged.
    op.execute(
        "INSERT INTO daily_charges (project_id, charge_type, charge_date, account_id, quantity_units,"
        " amount_units, run_id, recorded_at) " + _EXPAND[dialect]
    )
    op.execute(
        "DELETE FROM daily_charges WHERE charge_date > (SELECT MAX(billing_day) FROM billed_days)"
        " AND substr(CAST(charge_date AS TEXT), 1, 7) NOT IN (SELECT period FROM month_closes)"
    )
    op.create_index("ix_daily_charges_account_date", "daily_charges", ["account_id", "charge_date"])
    op.drop_index("ix_charge_periods_account_first", table_name="charge_periods")
    op.drop_table("charge_periods")
