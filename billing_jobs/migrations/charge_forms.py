"""Charges turned from one form into another in batches of projects through
`rules.periods` (migrations 0012 and 0013; SQLite's way, and every downgrade's): days
(0011's `daily_charges`), runs of equal days (`daily` NULL) and the month form
(`daily` set) of `charge_periods`.

`from_daily_charges` writes the canonical periods of the daily charges;
`to_month_forms` turns the runs of every charge type but the storage fee into month
forms; `to_runs` turns month forms back into runs. All in the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
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
DAILY = sa.table(
    "daily_charges",
    sa.column("project_id", sa.String),
    sa.column("charge_type", sa.String),
    sa.column("charge_date", sa.Date),
    sa.column("account_id", sa.String),
    sa.column("quantity_units", sa.BigInteger),
    sa.column("amount_units", sa.BigInteger),
    sa.column("run_id", sa.String),
    sa.column("recorded_at", sa.DateTime),
)
DAYS_PER_BATCH = 200_000


def from_daily_charges(conn: sa.Connection) -> None:
    """Every row of `daily_charges` into `charge_periods`, in the canonical form of
    `rules.periods` (the storage fee as runs, every other charge type as month forms),
    each period with the run and time of its latest recorded day. The daily rows are
    read once, in the primary key's order, a batch of whole projects at a time."""
    d = DAILY.c
    columns = [
        d.project_id,
        d.charge_type,
        day_number(conn, d.charge_date).label("day"),
        d.account_id,
        d.quantity_units,
        d.amount_units,
        d.run_id,
        d.recorded_at,
    ]
    for lo, hi in _project_ranges(conn):
        stmt = (
            sa.select(*columns)
            .where(d.project_id >= lo, d.project_id <= hi)
            .order_by(d.project_id, d.charge_type, d.charge_date)
        )
        days = read_frame(conn, stmt, ints=["day", "quantity_units", "amount_units"], aggregate=True)
        found = periods.from_days(days[periods.DAY_COLUMNS])
        bulk_insert(
            conn, charge_periods, _stamped(found, days)[_STORED], date_columns=["first_day", "last_day"]
        )


def _project_ranges(conn: sa.Connection) -> Iterator[tuple[str, str]]:
    """(first, last) project ids of batches of whole projects of about DAYS_PER_BATCH
    daily rows, in id order (the primary key's); the counts read a page at a time."""
    d = DAILY.c
    first: str | None = None
    last: str | None = None
    rows = 0
    while True:
        page = sa.select(d.project_id, sa.func.count()).group_by(d.project_id).order_by(d.project_id)
        if last is not None:
            page = page.where(d.project_id > last)
        counts = conn.execute(page.limit(PROJECTS_PER_BATCH)).all()
        for project, n in counts:
            first = project if first is None else first
            last, rows = project, rows + n
            if rows >= DAYS_PER_BATCH:
                yield first, project
                first, rows = None, 0
        if len(counts) < PROJECTS_PER_BATCH:
            break
    if first is not None and last is not None:
        yield first, last


def _stamped(found: pd.DataFrame, days: pd.DataFrame) -> pd.DataFrame:
    """Periods with the run and time of their latest recorded day. A day's period is the
    latest of its (project, charge type, account) to start on or before it: runs of a
    project and type do not overlap, and month forms are one per account and month."""
    by = ["project_id", "charge_type", "account_id"]
    codes = [pd.factorize(pd.concat([found[c], days[c]], ignore_index=True))[0] for c in by]
    key = np.zeros(len(found) + len(days), dtype=np.int64)
    for code in codes:  # numbered again after each column: below the rows' count
        key = pd.factorize(key * (int(code.max()) + 1) + code)[0].astype(np.int64)
    shift = np.int64(1 << 20)  # day numbers are below 2**20 (the year 4840)
    starts = key[: len(found)] * shift + found["first_day"].to_numpy(dtype=np.int64)
    order = np.argsort(starts, kind="stable")
    at = np.searchsorted(
        starts[order], key[len(found) :] * shift + days["day"].to_numpy(dtype=np.int64), "right"
    )
    period = order[at - 1]
    if (at == 0).any() or (key[period] != key[len(found) :]).any():
        raise AssertionError("daily charges: a day outside every period")
    stamp = pd.to_datetime(days["recorded_at"], format="ISO8601").to_numpy()
    latest = np.lexsort((stamp, period))
    last = latest[np.r_[period[latest][1:] != period[latest][:-1], True]]
    if len(last) != len(found):
        raise AssertionError(f"daily charges: {len(found)} periods, {len(last)} with days")
    return found.assign(
        run_id=days["run_id"].to_numpy(dtype=object)[last], recorded_at=days["recorded_at"].to_numpy()[last]
    )


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
