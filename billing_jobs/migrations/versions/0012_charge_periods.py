"""charge_periods: charges stored as periods instead of one row per project and day

Revision ID: 0012
Revises: 0011

Every run of consecutive days of one month with the same (project, charge type,
account, daily quantity, daily amount) in `daily_charges` becomes one row of
`charge_periods` (its canonical form, `rules.periods`); then `daily_charges` is
dropped. The table has the column `daily` of 0013's month form from the start.

PostgreSQL writes the storage fee's runs and, for every other charge type (the cloud
fees), 0013's month forms straight from the daily rows: two statements that read
them in the primary key's order, with no sort of every daily row and no runs of cloud
fees written only to be read back, deleted and grouped again by 0013. SQLite, whose
windows sort, reads the daily rows once in batches of whole projects and writes their
canonical periods through `rules.periods` (`migrations.charge_forms`). Either way
0013 then finds nothing to convert. Both in the migration's transaction: a kill rolls
it back, and a re-run starts over.
Downgrade expands the periods back (month forms first turned into runs).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from billing_jobs import faults
from billing_jobs.migrations import charge_forms

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

_KEY = ("project_id", "charge_type", "first_day")
# PostgreSQL: the storage fee's runs. A day starts a run unless the day before is the
# project's previous storage day with the same values, in the same month (a day that is
# not a month's first); a day's run starts at the latest start up to it (the running
# maximum). One window order, the primary key's; the runs grouped by hashing.
_STORAGE_RUNS = """
INSERT INTO charge_periods (project_id, charge_type, first_day, last_day, days, account_id,
                            quantity_units, amount_units, daily, run_id, recorded_at)
SELECT project_id, 'storage_fee', first_of, MAX(charge_date), COUNT(*), account_id,
       quantity_units, amount_units, NULL, MAX(run_id), MAX(recorded_at)
  FROM (SELECT m.*, MAX(CASE WHEN starts THEN charge_date END)
                        OVER (PARTITION BY project_id ORDER BY charge_date ROWS UNBOUNDED PRECEDING) AS first_of
          FROM (SELECT d.*,
                       (LAG(charge_date) OVER w IS DISTINCT FROM charge_date - 1
                        OR LAG(account_id) OVER w IS DISTINCT FROM account_id
                        OR LAG(quantity_units) OVER w IS DISTINCT FROM quantity_units
                        OR LAG(amount_units) OVER w IS DISTINCT FROM amount_units
                        OR EXTRACT(DAY FROM charge_date) = 1) AS starts
                  FROM daily_charges d
                 WHERE charge_type = 'storage_fee'
                WINDOW w AS (PARTITION BY project_id ORDER BY charge_date)) m) r
 GROUP BY project_id, first_of, account_id, quantity_units, amount_units
"""

# PostgreSQL: every other charge type (the cloud fees) in 0013's month form, in the
# spelling of `rules.periods` (day order, single spaces, integers as text): one row per
# (project, charge type, account, month), its days' offsets from the first one, with
# the run and time of its latest recorded day. The month as the day before its first
# (date arithmetic, no time zone); the grouping follows the window's order.
_MONTH_FORMS = """
INSERT INTO charge_periods (project_id, charge_type, first_day, last_day, days, account_id,
                            quantity_units, amount_units, daily, run_id, recorded_at)
SELECT project_id, charge_type, MIN(charge_date), MAX(charge_date), COUNT(*), account_id,
       SUM(quantity_units), SUM(amount_units),
       string_agg((charge_date - month_first)::text || ' ' || quantity_units::text || ' '
                  || amount_units::text, ' ' ORDER BY charge_date),
       (array_agg(run_id ORDER BY recorded_at DESC, run_id DESC))[1], MAX(recorded_at)
  FROM (SELECT d.*, charge_date - EXTRACT(DAY FROM charge_date)::int AS month_of,
               MIN(charge_date) OVER (PARTITION BY project_id, charge_type, account_id,
                                      charge_date - EXTRACT(DAY FROM charge_date)::int) AS month_first
          FROM daily_charges d
         WHERE charge_type <> 'storage_fee') s
 GROUP BY project_id, charge_type, account_id, month_of
"""


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
        sa.Column("daily", sa.Text(), nullable=True),
        sa.Column("run_id", sa.String(36), nullable=False),
        sa.Column("recorded_at", sa.DateTime(), nullable=False),
        *([] if key_after else [sa.PrimaryKeyConstraint(*_KEY, name="pk_charge_periods")]),
    )
    if dialect == "postgresql":
        # Memory for the groupings and the index builds, this transaction only; the daily
        # rows in the primary key's order (project, charge type, day) from its index, for
        # the windows and groupings that follow that order, rather than sorted again.
        op.execute("SET LOCAL work_mem = '256MB'")
        op.execute("SET LOCAL maintenance_work_mem = '512MB'")
        op.execute("SET LOCAL enable_sort = off")
        op.execute(_STORAGE_RUNS)
        op.execute(_MONTH_FORMS)
        op.execute("RESET enable_sort")
    else:  # SQLite sorts for a window: the days through pandas, a batch of projects at a time
        charge_forms.from_daily_charges(op.get_bind())
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
    if "daily" in {c["name"] for c in sa.inspect(op.get_bind()).get_columns("charge_periods")}:
        charge_forms.to_runs(op.get_bind())  # month forms written by 0012 itself
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
