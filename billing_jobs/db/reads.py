"""Reads of the source tables: filtering and aggregation done by the database.

Every amount is read as exact integer units computed in SQL
(`CAST(ROUND(x * 10000) AS BIGINT)`), so a NUMERIC that SQLite stores as a float
never passes through Python as one. Rows the database can tell are bad (missing,
non-numeric or non-finite amounts, unknown projects or metrics) are read by
separate queries, with their reason, so valid aggregates and rejects always
partition the rows.

Results stream in bounded batches (`yield_per`) into DataFrames.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Date,
    DateTime,
    Select,
    String,
    and_,
    case,
    cast,
    extract,
    func,
    literal,
    literal_column,
    not_,
    or_,
    select,
    type_coerce,
)
from sqlalchemy.sql.expression import BindParameter

from billing_jobs.db.billing_tables import charge_totals, daily_charges
from billing_jobs.db.source_tables import (
    cloud_usage,
    compute_usage,
    project_events,
    projects,
)
from billing_jobs.rules.cloud_fee import LINE_TYPES
from billing_jobs.rules.money import UNITS_PER_CREDIT

BATCH = 50_000
# The day-weighted fingerprint of a project's charges weighs each day by its amount
# modulo a prime, so that it stays far inside BIGINT whatever the amounts.
DW_MODULUS = 1_000_003

# Reject reasons for amounts (stable codes).
MISSING = "missing_amount"
NON_NUMERIC = "non_numeric_amount"
NON_FINITE = "non_finite_amount"
NEGATIVE = "negative_quantity"
UNKNOWN_PROJECT = "unknown_project"
UNKNOWN_METRIC = "unknown_metric"


@dataclass(frozen=True)
class Chunk:
    """A range of accounts, `lo < account_id <= hi` (None: unbounded), or one account."""

    lo: str | None = None
    hi: str | None = None
    account: str | None = None

    @classmethod
    def only(cls, account_id: str) -> Chunk:
        return cls(account=account_id)

    def mask(self, account_ids: pd.Series) -> np.ndarray:
        """Which of these account ids belong to the chunk (vectorized `clause`)."""
        known: np.ndarray = np.asarray(account_ids.notna(), dtype=bool)
        values = account_ids.astype(object).where(known, "")
        if self.account is not None:
            same: np.ndarray = known & np.asarray(values == self.account, dtype=bool)
            return same
        keep: np.ndarray = known.copy()
        if self.lo is not None:
            keep &= np.asarray(values > self.lo, dtype=bool)
        if self.hi is not None:
            keep &= np.asarray(values <= self.hi, dtype=bool)
        return keep

    def rows_of(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The rows of a frame with an `account_id` column that belong to the chunk."""
        return frame.loc[self.mask(frame["account_id"])]

    def clause(self, column: ColumnElement[Any]) -> ColumnElement[bool]:
        if self.account is not None:
            return column == self.account
        parts = []
        if self.lo is not None:
            parts.append(column > self.lo)
        if self.hi is not None:
            parts.append(column <= self.hi)
        return and_(*parts) if parts else literal(True)


def ts_param(conn: Connection, value: datetime) -> BindParameter[Any]:
    """A UTC bound that compares correctly with stored timestamps on every back end.

    SQLite stores timestamps as text with or without fractional seconds; a bound
    without a fraction compares right with both forms.
    """
    if conn.dialect.name == "sqlite":
        text = value.strftime("%Y-%m-%d %H:%M:%S")
        if value.microsecond:
            text += f".{value.microsecond:06d}"
        return literal(text, String)
    return literal(value, DateTime)


def date_param(conn: Connection, value: date) -> BindParameter[Any]:
    if conn.dialect.name == "sqlite":
        return literal(value.isoformat(), String)
    return literal(value, Date)


def raw(conn: Connection, column: ColumnElement[Any]) -> ColumnElement[Any]:
    """Timestamps and dates as stored text on SQLite (parsed vectorized later)."""
    return type_coerce(column, String) if conn.dialect.name == "sqlite" else column


def units(column: ColumnElement[Any]) -> ColumnElement[int]:
    """Exact units of 1/10,000 of a NUMERIC value."""
    return cast(func.round(column * UNITS_PER_CREDIT), BigInteger)


def summed_units(
    conn: Connection, column: ColumnElement[Any], usable: ColumnElement[bool]
) -> ColumnElement[int]:
    """The sum, in exact units, of the usable values of a NUMERIC column in a group.

    PostgreSQL's NUMERIC(18,4) is exact: it sums the values and scales the group's
    sum once. SQLite stores NUMERIC as a float, so each value is made whole units
    first and the integers are summed.
    """
    if conn.dialect.name == "postgresql":
        total = func.coalesce(func.sum(column).filter(usable), 0)
        return cast(func.round(total * UNITS_PER_CREDIT), BigInteger)
    return func.coalesce(func.sum(case((usable, units(column)), else_=None)), 0)


def amount_problem(conn: Connection, column: ColumnElement[Any]) -> ColumnElement[Any]:
    """NULL for a usable amount, else the reason it cannot be used."""
    if conn.dialect.name == "sqlite":
        return case(
            (column.is_(None), MISSING),
            (func.typeof(column).not_in(["integer", "real"]), NON_NUMERIC),
            (or_(column > 1e15, column < -1e15), NON_FINITE),
            else_=None,
        )
    specials: list[ColumnElement[Any]] = [
        literal_column(f"'{v}'::numeric") for v in ("NaN", "Infinity", "-Infinity")
    ]
    return case(
        (column.is_(None), MISSING),
        (column.in_(specials), NON_FINITE),
        else_=None,
    )


def _frame(
    conn: Connection,
    stmt: Select[Any],
    *,
    timestamps: Sequence[str] = (),
    dates: Sequence[str] = (),
    ints: Sequence[str] = (),
    aggregate: bool = False,
) -> pd.DataFrame:
    """Run `stmt` into a DataFrame, column by column.

    Row-level reads stream in batches (a server-side cursor on PostgreSQL).
    `aggregate` reads, whose size is bounded by the number of projects, are
    fetched in one go: PostgreSQL then may run them with parallel workers, which
    it never does for a cursor.
    """
    gathered: list[list[Any]]
    if aggregate:
        result = conn.execute(stmt)
        columns = list(result.keys())
        rows = result.all()
        gathered = [list(values) for values in zip(*rows, strict=True)] if rows else [[] for _ in columns]
    else:
        # Per statement: a connection-level option would make every later query a cursor.
        result = conn.execute(stmt.execution_options(yield_per=BATCH))
        columns = list(result.keys())
        gathered = [[] for _ in columns]
        for batch in result.partitions():
            for target, values in zip(gathered, zip(*batch, strict=True), strict=True):
                target.extend(values)
    df = pd.DataFrame({c: pd.Series(v, dtype=object) for c, v in zip(columns, gathered, strict=True)})
    for col in timestamps:
        df[col] = _to_datetime(df[col])
    for col in dates:
        df[col] = _to_day_numbers(df[col])
    for col in ints:
        df[col] = df[col].astype(np.int64) if len(df) else pd.Series(dtype=np.int64)
    return df


def _to_datetime(values: pd.Series) -> pd.Series:
    if values.empty:
        return pd.Series(dtype="datetime64[us]")
    if isinstance(values.iloc[0], str):
        return pd.to_datetime(values, format="ISO8601").astype("datetime64[us]")
    return pd.to_datetime(values).astype("datetime64[us]")


def _to_day_numbers(values: pd.Series) -> pd.Series:
    if values.empty:
        return pd.Series(dtype="int64")
    parsed = pd.to_datetime(values.astype(str), format="ISO8601")
    return pd.Series(parsed.to_numpy().astype("datetime64[D]").astype(np.int64), index=values.index)


def account_chunks(conn: Connection, projects_per_chunk: int) -> list[Chunk]:
    """Account ranges holding about `projects_per_chunk` projects each."""
    counts = conn.execute(
        select(projects.c.account_id, func.count())
        .group_by(projects.c.account_id)
        .order_by(projects.c.account_id)
        .execution_options(yield_per=BATCH)
    )
    chunks: list[Chunk] = []
    lo: str | None = None
    running = 0
    last: str | None = None
    for account_id, n in counts:
        running += n
        last = account_id
        if running >= projects_per_chunk:
            chunks.append(Chunk(lo, account_id))
            lo, running = account_id, 0
    if running or not chunks:
        chunks.append(Chunk(lo, None) if last is not None or lo is not None else Chunk())
    return chunks


def read_projects(conn: Connection, chunk: Chunk) -> pd.DataFrame:
    """project_id, account_id, created_at (naive UTC) of the chunk's projects."""
    stmt = (
        select(projects.c.project_id, projects.c.account_id, raw(conn, projects.c.created_at))
        .where(chunk.clause(projects.c.account_id))
        .order_by(projects.c.project_id)
    )
    return _frame(conn, stmt, timestamps=["created_at"])


def _event_columns(conn: Connection) -> Select[Any]:
    return select(
        project_events.c.event_id,
        project_events.c.project_id,
        raw(conn, project_events.c.occurred_at).label("occurred_at"),
        project_events.c.kind,
    )


def read_events(conn: Connection, chunk: Chunk) -> pd.DataFrame:
    """Events of the chunk's projects: event_id, project_id, occurred_at, kind."""
    stmt = (
        _event_columns(conn)
        .join(projects, projects.c.project_id == project_events.c.project_id)
        .where(chunk.clause(projects.c.account_id))
    )
    return _frame(conn, stmt, timestamps=["occurred_at"])


def read_orphan_events(conn: Connection) -> pd.DataFrame:
    """Events naming a project that does not exist."""
    stmt = (
        _event_columns(conn)
        .outerjoin(projects, projects.c.project_id == project_events.c.project_id)
        .where(projects.c.project_id.is_(None))
    )
    return _frame(conn, stmt, timestamps=["occurred_at"])


def read_compute_totals(conn: Connection, start: datetime, end: datetime, chunk: Chunk) -> pd.DataFrame:
    """Per project with compute rows in [start, end): account_id (None for an unknown
    project), compute_units (sum of the usable rows) and bad_rows (rows that cannot
    count), in one scan; `read_compute_rejects` then needs to look at those projects only."""
    c = compute_usage.c
    problem = amount_problem(conn, c.credits)
    bad = or_(projects.c.project_id.is_(None), problem.is_not(None))
    stmt = (
        select(
            c.project_id,
            projects.c.account_id,
            summed_units(conn, c.credits, problem.is_(None)).label("compute_units"),
            func.sum(case((bad, 1), else_=0)).label("bad_rows"),
        )
        .outerjoin(projects, projects.c.project_id == c.project_id)
        .where(
            chunk.clause(projects.c.account_id),
            raw(conn, c.occurred_at) >= ts_param(conn, start),
            raw(conn, c.occurred_at) < ts_param(conn, end),
        )
        .group_by(c.project_id, projects.c.account_id)
    )
    return _frame(conn, stmt, ints=["compute_units", "bad_rows"], aggregate=True)


def read_compute_rejects(
    conn: Connection, start: datetime, end: datetime, project_ids: Sequence[str] | None = None
) -> pd.DataFrame:
    """Compute rows in [start, end) that cannot count: usage_id, project_id, occurred_at, reason, value.

    project_ids: look at these projects only (those `read_compute_totals` found bad rows for).
    """
    if project_ids is None:
        return _compute_rejects(conn, start, end, None)
    parts = [_compute_rejects(conn, start, end, ids) for ids in batches(sorted(project_ids), 500)]
    return pd.concat(parts, ignore_index=True) if parts else _compute_rejects(conn, start, end, [])


def _compute_rejects(
    conn: Connection, start: datetime, end: datetime, project_ids: Sequence[str] | None
) -> pd.DataFrame:
    c = compute_usage.c
    problem = amount_problem(conn, c.credits)
    reason = case((projects.c.project_id.is_(None), UNKNOWN_PROJECT), else_=problem)
    stmt = (
        select(
            c.usage_id,
            c.project_id,
            raw(conn, c.occurred_at).label("occurred_at"),
            reason.label("reason"),
            cast(c.credits, String).label("value"),
        )
        .outerjoin(projects, projects.c.project_id == c.project_id)
        .where(
            raw(conn, c.occurred_at) >= ts_param(conn, start),
            raw(conn, c.occurred_at) < ts_param(conn, end),
            or_(projects.c.project_id.is_(None), problem.is_not(None)),
        )
    )
    if project_ids is not None:
        stmt = stmt.where(c.project_id.in_(list(project_ids)))
    return _frame(conn, stmt, timestamps=["occurred_at"])


def _quantity_problem(conn: Connection) -> ColumnElement[Any]:
    c = cloud_usage.c
    return case(
        (c.metric.not_in(list(LINE_TYPES)), UNKNOWN_METRIC),
        else_=amount_problem(conn, c.quantity),
    )


def read_cloud_usage(conn: Connection, first: date, last: date, chunk: Chunk) -> pd.DataFrame:
    """Usable cloud rows of the chunk summed per (project_id, day, metric): quantity_units.

    Also carries each row's account_id, so a frame read for many chunks can be split.
    """
    c = cloud_usage.c
    problem = _quantity_problem(conn)
    stmt = (
        select(
            c.project_id,
            projects.c.account_id,
            raw(conn, c.usage_date).label("day"),
            c.metric,
            summed_units(conn, c.quantity, literal(True)).label("quantity_units"),
        )
        .join(projects, projects.c.project_id == c.project_id)
        .where(
            chunk.clause(projects.c.account_id),
            raw(conn, c.usage_date) >= date_param(conn, first),
            raw(conn, c.usage_date) <= date_param(conn, last),
            problem.is_(None),
            not_(c.quantity < 0),
        )
        .group_by(c.project_id, projects.c.account_id, raw(conn, c.usage_date), c.metric)
    )
    return _frame(conn, stmt, dates=["day"], ints=["quantity_units"], aggregate=True)


def read_cloud_rejects(conn: Connection, first: date, last: date) -> pd.DataFrame:
    """Cloud rows that cannot be billed whatever the project's state."""
    c = cloud_usage.c
    problem = _quantity_problem(conn)
    reason = case(
        (projects.c.project_id.is_(None), UNKNOWN_PROJECT),
        (problem.is_not(None), problem),
        else_=NEGATIVE,
    )
    stmt = (
        select(
            c.usage_id,
            c.project_id,
            raw(conn, c.usage_date).label("day"),
            c.metric,
            reason.label("reason"),
            cast(c.quantity, String).label("value"),
        )
        .outerjoin(projects, projects.c.project_id == c.project_id)
        .where(
            raw(conn, c.usage_date) >= date_param(conn, first),
            raw(conn, c.usage_date) <= date_param(conn, last),
            or_(
                projects.c.project_id.is_(None),
                problem.is_not(None),
                c.quantity < 0,
            ),
        )
    )
    return _frame(conn, stmt, dates=["day"])


def read_cloud_rows(conn: Connection, groups: pd.DataFrame, first: date, last: date) -> pd.DataFrame:
    """The usable rows behind (project_id, day, metric) groups: usage_id, project_id, day, metric, value."""
    if groups.empty:
        return pd.DataFrame(columns=["usage_id", "project_id", "day", "metric", "value"])
    c = cloud_usage.c
    parts = []
    for ids in batches(sorted(set(groups["project_id"])), 500):
        stmt = select(
            c.usage_id,
            c.project_id,
            raw(conn, c.usage_date).label("day"),
            c.metric,
            cast(c.quantity, String).label("value"),
        ).where(
            c.project_id.in_(ids),
            raw(conn, c.usage_date) >= date_param(conn, first),
            raw(conn, c.usage_date) <= date_param(conn, last),
            _quantity_problem(conn).is_(None),
            not_(c.quantity < 0),
        )
        parts.append(_frame(conn, stmt, dates=["day"]))
    rows = pd.concat(parts, ignore_index=True)
    return rows.merge(groups[["project_id", "day", "metric"]], on=["project_id", "day", "metric"])


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of at most `size` items (for IN lists of bounded length)."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


def read_charge_fingerprints(conn: Connection, first: date, last: date, chunk: Chunk) -> pd.DataFrame:
    """Per (project, charge type) of days first..last (one month) in `daily_charges`:
    account_id, n (rows), amount, quantity, dw (day-of-month weighted amount)."""
    dc = daily_charges.c
    dom = extract("day", dc.charge_date)
    stmt = (
        select(
            dc.project_id,
            dc.charge_type,
            dc.account_id,
            func.count().label("n"),
            func.sum(dc.amount_units).label("amount"),
            func.sum(dc.quantity_units).label("quantity"),
            func.sum(dom * (dc.amount_units % DW_MODULUS)).label("dw"),
        )
        .where(chunk.clause(dc.account_id), dc.charge_date >= first, dc.charge_date <= last)
        .group_by(dc.project_id, dc.charge_type, dc.account_id)
    )
    return _frame(conn, stmt, ints=["n", "amount", "quantity", "dw"], aggregate=True)


def read_month_fingerprints(conn: Connection, period: str, chunk: Chunk) -> pd.DataFrame:
    """The same fingerprints for a whole month, from `charge_totals` (one row per
    project and charge type, kept with the charges) instead of every daily charge."""
    ct = charge_totals.c
    stmt = select(ct.project_id, ct.charge_type, ct.account_id, ct.n, ct.amount, ct.quantity, ct.dw).where(
        ct.period == period, chunk.clause(ct.account_id)
    )
    return _frame(conn, stmt, ints=["n", "amount", "quantity", "dw"], aggregate=True)
