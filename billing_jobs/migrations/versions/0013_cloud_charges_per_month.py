"""charge_periods: cloud fees stored per project, charge type, month and account

Revision ID: 0013
Revises: 0012

The cloud fees' daily amounts differ from day to day, so as runs of equal days they
took about as many rows as days. This revision adds `charge_periods.daily` and turns
every charge type but the storage fee into the month form of `rules.periods`: one row
per (project, charge type, month, account) listing each day's quantity and amount.
PostgreSQL converts them in one statement, SQLite in batches of projects; both in the
migration's one transaction: a kill rolls it back, and a re-run starts over.
Downgrade expands the month forms back into runs.
"""

from __future__ import annotations

from collections.abc import Iterator

import sqlalchemy as sa
from alembic import op

from billing_jobs import faults
from billing_jobs.db.billing_tables import charge_periods
from billing_jobs.db.reads import day_number, read_frame
from billing_jobs.db.writes import bulk_insert
from billing_jobs.frames import pd
from billing_jobs.rules import periods

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

PROJECTS_PER_BATCH = 2_000
_TABLE = sa.table(
    "charge_periods",
    sa.column("project_id", sa.String),
    sa.column("charge_type", sa.String),
    sa.column("first_day", sa.Date),
    sa.column("last_day", sa.Date),
    sa.column("days", sa.Integer),
    sa.column("account_id", sa.String),
    sa.column("quantity_units", sa.BigInteger),
    sa.column("amount_units", sa.BigInteger),
    sa.column("daily", sa.Text),
    sa.column("run_id", sa.String),
    sa.column("recorded_at", sa.DateTime),
)
_STORED = [*periods.COLUMNS, "run_id", "recorded_at"]
_INTS = ["first_day", "last_day", "days", "quantity_units", "amount_units"]


def _month(days: pd.Series) -> object:
    return days.to_numpy(dtype="int64").astype("datetime64[D]").astype("datetime64[M]")


def _batches(conn: sa.Connection, which: sa.ColumnElement[bool]) -> Iterator[list[str]]:
    """The ids of the projects with rows to convert, in batches, in id order."""
    t = _TABLE.c
    after: str | None = None
    while True:
        stmt = sa.select(t.project_id).where(t.charge_type != "storage_fee", which).distinct()
        if after is not None:
            stmt = stmt.where(t.project_id > after)
        ids = [p for (p,) in conn.execute(stmt.order_by(t.project_id).limit(PROJECTS_PER_BATCH))]
        if not ids:
            return
        yield ids
        after = ids[-1]


def _read(conn: sa.Connection, ids: list[str], which: sa.ColumnElement[bool]) -> pd.DataFrame:
    """The batch's rows, days as day numbers (computed by the database)."""
    t = _TABLE.c
    columns = [day_number(conn, t[c]).label(c) if c in ("first_day", "last_day") else t[c] for c in _STORED]
    stmt = sa.select(*columns).where(t.project_id.in_(ids), t.charge_type != "storage_fee", which)
    return read_frame(conn, stmt, ints=_INTS, aggregate=True)


def _rewrite(
    conn: sa.Connection, ids: list[str], old: pd.DataFrame, new: pd.DataFrame, which: sa.ColumnElement[bool]
) -> None:
    """Replace the batch's rows by `new`, each with the latest run and time of the old
    rows of its (project, charge type, month, account)."""
    t = _TABLE.c
    key = ["project_id", "charge_type", "account_id", "month"]
    old = old.assign(month=_month(old["first_day"]))
    latest = old.sort_values(["recorded_at", "run_id"]).drop_duplicates(key, keep="last")
    new = new.assign(month=_month(new["first_day"])).merge(latest[[*key, "run_id", "recorded_at"]], on=key)
    conn.execute(sa.delete(_TABLE).where(t.project_id.in_(ids), t.charge_type != "storage_fee", which))
    bulk_insert(conn, charge_periods, new[_STORED], date_columns=["first_day", "last_day"])


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
    op.add_column("charge_periods", sa.Column("daily", sa.Text(), nullable=True))
    conn = op.get_bind()
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(_POSTGRESQL)
    else:  # SQLite 3.40 cannot order a group_concat: batches of projects through pandas
        runs = _TABLE.c.daily.is_(None)
        for ids in _batches(conn, runs):
            old = _read(conn, ids, runs)
            _rewrite(conn, ids, old, periods.from_days(periods.to_days(old)), runs)
    faults.in_migration(revision)


def downgrade() -> None:
    conn = op.get_bind()
    months = _TABLE.c.daily.is_not(None)
    for ids in _batches(conn, months):
        old = _read(conn, ids, months)
        _rewrite(
            conn,
            ids,
            old,
            periods.canonical(
                periods.to_days(old).assign(first_day=lambda d: d["day"], last_day=lambda d: d["day"])
            ),
            months,
        )
    with op.batch_alter_table("charge_periods") as batch:
        batch.drop_column("daily")
