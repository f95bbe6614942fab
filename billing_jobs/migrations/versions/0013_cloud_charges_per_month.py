"""charge_periods: cloud fees stored per project, charge type, month and account

Revision ID: 0013
Revises: 0012

The cloud fees' daily amounts differ from day to day, so as runs of equal days they
took about as many rows as days. This revision adds `charge_periods.daily` (unless 0012
created it) and turns every run of a charge type but the storage fee into the month
form of `rules.periods`: one row per (project, charge type, month, account) listing
each day's quantity and amount. PostgreSQL converts them in one statement, SQLite in
batches of projects; both in the migration's one transaction: a kill rolls it back,
and a re-run starts over. 0012 now writes the month forms straight from the daily
charges, so an upgrade from 0011 finds no run to convert here; a database that an
earlier version migrated to 0012, or one downgraded to it, has runs.
Downgrade expands the month forms back into runs.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from billing_jobs import faults
from billing_jobs.migrations import charge_forms

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


# PostgreSQL builds the month forms in one statement, in the same spelling as
# `rules.periods` (day order, single spaces, integers as text): the runs deleted and
# expanded into days, grouped per (project, charge type, account, month), each group
# with its latest run. The grouping reads every deleted run before it inserts a row,
# and a row the statement deleted does not conflict with one it inserts. No temporary
# table: the migration role needs no TEMPORARY privilege.
_POSTGRESQL = """
WITH old AS (
    DELETE FROM charge_periods WHERE charge_type <> 'storage_fee' AND daily IS NULL
    RETURNING project_id, charge_type, first_day, days, account_id, quantity_units, amount_units,
              run_id, recorded_at
), day_rows AS (
    SELECT o.project_id, o.charge_type, o.account_id, o.quantity_units, o.amount_units,
           o.run_id, o.recorded_at, o.first_day + g.n AS day,
           MIN(o.first_day) OVER (PARTITION BY o.project_id, o.charge_type, o.account_id,
                                  date_trunc('month', o.first_day)) AS month_first
      FROM old o CROSS JOIN LATERAL generate_series(0, o.days - 1) AS g(n)
)
INSERT INTO charge_periods (project_id, charge_type, first_day, last_day, days, account_id,
                            quantity_units, amount_units, daily, run_id, recorded_at)
SELECT project_id, charge_type, MIN(day), MAX(day), COUNT(*), account_id,
       SUM(quantity_units), SUM(amount_units),
       string_agg((day - month_first)::text || ' ' || quantity_units::text || ' ' || amount_units::text,
                  ' ' ORDER BY day),
       (array_agg(run_id ORDER BY recorded_at DESC, run_id DESC))[1], MAX(recorded_at)
  FROM day_rows
 GROUP BY project_id, charge_type, account_id, month_first
"""


def upgrade() -> None:
    conn = op.get_bind()
    # 0012 creates the column and stores the cloud fees as month forms: from 0011, this
    # finds nothing to convert. A database migrated to 0012 by an earlier version, or
    # downgraded to it, has runs and no column.
    if "daily" not in {c["name"] for c in sa.inspect(conn).get_columns("charge_periods")}:
        op.add_column("charge_periods", sa.Column("daily", sa.Text(), nullable=True))
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(_POSTGRESQL)
    else:  # SQLite 3.40 cannot order a group_concat: batches of projects through pandas
        charge_forms.to_month_forms(conn)
    faults.in_migration(revision)


def downgrade() -> None:
    charge_forms.to_runs(op.get_bind())
    with op.batch_alter_table("charge_periods") as batch:
        batch.drop_column("daily")
