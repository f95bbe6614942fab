"""The cloud fees' two stored forms in `charge_periods`, converted in batches of
projects through `rules.periods` (migrations 0012 and 0013; SQLite's way, and every
downgrade's): runs of equal days (`daily` NULL), and the month form (`daily` set).

`to_month_forms` turns the runs of every charge type but the storage fee into month
forms; `to_runs` turns month forms back into runs. Each batch's periods are deleted
and written again in the caller's transaction, each new one with the latest run and
time of the old periods of its (project, charge type, month, account).
"""

from __future__ import annotations

from collections.abc import Iterator

import sqlalchemy as sa

from billing_jobs.db.billing_tables import charge_periods
from billing_jobs.db.reads import day_number, read_frame
from billing_jobs.db.writes import bulk_insert
from billing_jobs.frames import pd
from billing_jobs.rules import periods

PROJECTS_PER_BATCH = 2_000
TABLE = sa.table(
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


def to_month_forms(conn: sa.Connection) -> None:
    """Every cloud-fee run (every charge type but the storage fee) into month forms."""
    runs = TABLE.c.daily.is_(None)
    for ids in _batches(conn, runs):
        old = _read(conn, ids, runs)
        _rewrite(conn, ids, old, periods.from_days(periods.to_days(old)), runs)


def to_runs(conn: sa.Connection) -> None:
    """Every month form back into runs of equal days."""
    months = TABLE.c.daily.is_not(None)
    for ids in _batches(conn, months):
        old = _read(conn, ids, months)
        days = periods.to_days(old).assign(first_day=lambda d: d["day"], last_day=lambda d: d["day"])
        _rewrite(conn, ids, old, periods.canonical(days), months)


def _month(days: pd.Series) -> object:
    return days.to_numpy(dtype="int64").astype("datetime64[D]").astype("datetime64[M]")


def _batches(conn: sa.Connection, which: sa.ColumnElement[bool]) -> Iterator[list[str]]:
    """The ids of the projects with rows to convert, in batches, in id order."""
    t = TABLE.c
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
    t = TABLE.c
    columns = [day_number(conn, t[c]).label(c) if c in ("first_day", "last_day") else t[c] for c in _STORED]
    stmt = sa.select(*columns).where(t.project_id.in_(ids), t.charge_type != "storage_fee", which)
    return read_frame(conn, stmt, ints=_INTS, aggregate=True)


def _rewrite(
    conn: sa.Connection, ids: list[str], old: pd.DataFrame, new: pd.DataFrame, which: sa.ColumnElement[bool]
) -> None:
    """Replace the batch's rows by `new`, each with the latest run and time of the old
    rows of its (project, charge type, month, account)."""
    t = TABLE.c
    key = ["project_id", "charge_type", "account_id", "month"]
    old = old.assign(month=_month(old["first_day"]))
    latest = old.sort_values(["recorded_at", "run_id"]).drop_duplicates(key, keep="last")
    new = new.assign(month=_month(new["first_day"])).merge(latest[[*key, "run_id", "recorded_at"]], on=key)
    conn.execute(sa.delete(TABLE).where(t.project_id.in_(ids), t.charge_type != "storage_fee", which))
    bulk_insert(conn, charge_periods, new[_STORED], date_columns=["first_day", "last_day"])
