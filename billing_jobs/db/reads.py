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

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Date,
    DateTime,
    LargeBinary,
    Select,
    String,
    and_,
    case,
    cast,
    exists,
    func,
    literal,
    literal_column,
    not_,
    or_,
    select,
    type_coerce,
)
from sqlalchemy.sql.expression import BindParameter

from billing_jobs.db.billing_tables import charge_periods
from billing_jobs.db.engine import through_indexes
from billing_jobs.db.source_tables import (
    cloud_usage,
    compute_usage,
    project_events,
    projects,
)
from billing_jobs.db.sql import Chunk, among
from billing_jobs.frames import pd
from billing_jobs.rules.calendar import EPOCH, Month
from billing_jobs.rules.calendar import day_number as number_of
from billing_jobs.rules.cloud_fee import LINE_TYPES
from billing_jobs.rules.int_texts import integers
from billing_jobs.rules.money import UNITS_PER_CREDIT

BATCH = 50_000

# Reject reasons for amounts (stable codes).
MISSING = "missing_amount"
NON_NUMERIC = "non_numeric_amount"
NON_FINITE = "non_finite_amount"
OUT_OF_RANGE = "amount_out_of_range"
NEGATIVE = "negative_quantity"
UNKNOWN_PROJECT = "unknown_project"
UNKNOWN_METRIC = "unknown_metric"

# The largest credits or quantity one usage row may hold. Far above any real row, and
# small enough that the sums of a project's month stay exact 64-bit integers of units
# (9.2e18 units: over 900,000 rows at this limit) on every back end.
MAX_AMOUNT = 1_000_000_000


def shard_of(account_id: str, shards: int) -> int:
    """The shard (0..shards-1) an account belongs to: a hash of its UTF-8 bytes, the same
    on every machine, in every run and under any collation."""
    digest = hashlib.blake2b(account_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based): the accounts whose `shard_of` is `index`."""

    index: int = 0
    count: int = 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def plan_chunks(
    conn: Connection,
    projects_per_chunk: int,
    shard: Shard | None = None,
    *,
    also: Sequence[Select[Any]] = (),
) -> list[Chunk]:
    """The accounts with projects (of `shard`), in chunks of about `projects_per_chunk` projects.

    also: queries of more account ids to include though they may have no project
    now (accounts with charges or invoices to correct, whose projects moved or went).
    Accounts are grouped by the database and taken in the code-point order of their
    ids (Python's `str` order, whatever the database's collation), so the same data
    gives the same chunks; which chunk an account is in never changes a result.
    """

    def mine(account_id: str) -> bool:
        return shard is None or shard.count == 1 or shard_of(account_id, shard.count) == shard.index

    counts: dict[str, int] = {}
    query = select(projects.c.account_id, func.count()).group_by(projects.c.account_id)
    for batch in conn.execute(query.execution_options(yield_per=BATCH)).partitions():
        counts.update((a, int(n)) for a, n in batch if mine(a))
    for extra in also:
        for batch in conn.execute(extra.execution_options(yield_per=BATCH)).partitions():
            for (account_id,) in batch:
                if account_id not in counts and mine(account_id):
                    counts[account_id] = 1
    found = sorted(counts.items())
    chunks: list[Chunk] = []
    ids: list[str] = []
    running = 0
    for account_id, n in found:
        ids.append(account_id)
        running += n
        if running >= projects_per_chunk:
            chunks.append(Chunk(tuple(ids), len(chunks), running))
            ids, running = [], 0
    if ids:
        chunks.append(Chunk(tuple(ids), len(chunks), running))
    return chunks


def accounts_charged(first: date, last: date) -> Select[Any]:
    """The accounts with charges stored on days first..last, without reading the charges.

    A loose index scan of `(account_id, first_day)`: each step jumps to the next
    account id in the index and looks up whether it has a period that reaches those
    days. A period lies in one month, so one that reaches day `first` starts at most 30
    days before it: each lookup reads a bounded range of the index, and the work grows
    with the number of accounts, not with all history. The ids come in the index's
    order, which no result depends on.
    """
    cp = charge_periods.c
    walk = select(func.min(cp.account_id).label("account_id")).cte("account_walk", recursive=True)
    following = select(func.min(cp.account_id)).where(cp.account_id > walk.c.account_id).scalar_subquery()
    walk = walk.union_all(select(following).where(walk.c.account_id.is_not(None)))
    charged = exists().where(
        cp.account_id == walk.c.account_id,
        cp.first_day.between(first - timedelta(days=30), last),
        cp.last_day >= first,
    )
    return select(walk.c.account_id).where(walk.c.account_id.is_not(None), charged)


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


def units(conn: Connection, column: ColumnElement[Any]) -> ColumnElement[int]:
    """Exact units of 1/10,000 of a NUMERIC value, rounded half away from zero.

    PostgreSQL's cast of a NUMERIC to BIGINT rounds so itself (a `round` first cost
    about a fifth of a usage read's conversion, and changed nothing); SQLite's cast
    truncates, so its value is rounded first."""
    scaled = column * UNITS_PER_CREDIT
    return cast(scaled if conn.dialect.name == "postgresql" else func.round(scaled), BigInteger)


def day_number(conn: Connection, column: ColumnElement[Any], since: date | None = None) -> ColumnElement[int]:
    """A DATE as the number of days since 1970-01-01 (or since `since`: a day's offset
    in a read, one subtraction less per row), computed by the database."""
    if conn.dialect.name == "sqlite":
        julian = 2440587.5 + (number_of(since) if since is not None else 0)
        return cast(func.julianday(column) - julian, BigInteger)
    return cast(column - literal_column(f"DATE '{(since or EPOCH).isoformat()}'"), BigInteger)


def summed_units(
    conn: Connection, column: ColumnElement[Any], usable: ColumnElement[bool] | None
) -> ColumnElement[int]:
    """The sum, in exact units, of the usable values of a NUMERIC column in a group.

    PostgreSQL's NUMERIC(18,4) is exact: it sums the values and scales the group's
    sum once. SQLite stores NUMERIC as a float, so each value is made whole units
    first and the integers are summed.
    """
    if conn.dialect.name == "postgresql":
        summed = func.sum(column) if usable is None else func.sum(column).filter(usable)
        return cast(func.round(func.coalesce(summed, 0) * UNITS_PER_CREDIT), BigInteger)
    if usable is None:
        return func.coalesce(func.sum(units(conn, column)), 0)
    return func.coalesce(func.sum(case((usable, units(conn, column)), else_=None)), 0)


def amount_problem(conn: Connection, column: ColumnElement[Any]) -> ColumnElement[Any]:
    """NULL for a usable amount, else the reason it cannot be used."""
    too_big = or_(column > MAX_AMOUNT, column < -MAX_AMOUNT)
    if conn.dialect.name == "sqlite":
        return case(
            (column.is_(None), MISSING),
            (func.typeof(column).not_in(["integer", "real"]), NON_NUMERIC),
            (column.in_([math.inf, -math.inf]), NON_FINITE),
            (too_big, OUT_OF_RANGE),
            else_=None,
        )
    specials: list[ColumnElement[Any]] = [
        literal_column(f"'{v}'::numeric") for v in ("NaN", "Infinity", "-Infinity")
    ]
    return case(
        (column.is_(None), MISSING),
        (column.in_(specials), NON_FINITE),
        (too_big, OUT_OF_RANGE),
        else_=None,
    )


def usable_amount(column: ColumnElement[Any], *, signed: bool) -> ColumnElement[bool]:
    """True exactly for the rows `amount_problem` finds nothing wrong with (and, unless
    `signed`, that are not negative), never NULL; a few plain comparisons per row.

    Both back ends order every other value outside the range: PostgreSQL sorts NaN
    above every number and the infinities beyond it; SQLite sorts text and blobs above
    every number, and stores no NaN. `tests/integration/test_usable_amounts.py`
    checks the two definitions against each other on every kind of bad value.
    """
    return and_(column.is_not(None), column >= (-MAX_AMOUNT if signed else 0), column <= MAX_AMOUNT)


def read_frame(
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
    fetched in one go, as the driver's tuples (outside a chunk's transactions,
    `serial_plans`, PostgreSQL may then run them with parallel workers, which it
    never does for a cursor).
    """
    if aggregate:
        result = conn.execute(stmt)
        columns = list(result.keys())
        # The driver's own tuples: aggregates are plain integers and text, with no type to
        # process, and a Row object per group would cost more than the group itself.
        cursor = result.cursor
        rows = cursor.fetchall() if cursor is not None else result.all()
        result.close()
        gathered = _column_arrays(rows, len(columns))
    else:
        # Per statement: a connection-level option would make every later query a cursor.
        result = conn.execute(stmt.execution_options(yield_per=BATCH))
        columns = list(result.keys())
        streamed: list[list[Any]] = [[] for _ in columns]
        for batch in result.partitions():  # Row objects, which numpy makes an array of slowly
            for target, values in zip(streamed, zip(*batch, strict=True), strict=True):
                target.extend(values)
        gathered = [_object_column(values) for values in streamed]
    if not gathered:
        gathered = [np.empty(0, dtype=object) for _ in columns]
    df = pd.DataFrame(
        {c: v.astype(np.int64) if c in ints else v for c, v in zip(columns, gathered, strict=True)}
    )
    for col in timestamps:
        df[col] = _to_datetime(df[col])
    for col in dates:
        df[col] = _to_day_numbers(df[col])
    return df


def _column_arrays(rows: Sequence[Sequence[Any]], width: int) -> list[np.ndarray]:
    """The rows' columns, each an object array: the rows made one 2-D array in C, then
    cut into columns (transposing the rows with `zip` cost three times as much, and
    was most of a large read's time in Python). Where numpy would open a value that
    is itself a sequence of equal lengths (an array column), column by column."""
    if not rows:
        return [np.empty(0, dtype=object) for _ in range(width)]
    try:
        table = np.array(rows, dtype=object)
    except ValueError:
        table = np.empty(0, dtype=object)
    if table.shape == (len(rows), width):
        return [table[:, i] for i in range(width)]
    return [_object_column([row[i] for row in rows]) for i in range(width)]


def _object_column(values: Sequence[Any]) -> np.ndarray:
    """One column's values as an object array of exactly that many values (never a
    second axis of values that are sequences themselves)."""
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


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


def read_projects(conn: Connection, chunk: Chunk) -> pd.DataFrame:
    """project_id, account_id, created_at (naive UTC) of the chunk's projects: a row per
    project, so fetched in one go (`read_frame`'s `aggregate`: no cursor's round trips,
    the driver's tuples)."""
    stmt = (
        select(projects.c.project_id, projects.c.account_id, raw(conn, projects.c.created_at))
        .where(chunk.clause(projects.c.account_id))
        .order_by(projects.c.project_id)
    )
    return read_frame(conn, stmt, timestamps=["created_at"], aggregate=True)


def _event_columns(conn: Connection) -> Select[Any]:
    return select(
        project_events.c.event_id,
        project_events.c.project_id,
        raw(conn, project_events.c.occurred_at).label("occurred_at"),
        project_events.c.kind,
    )


def read_events(conn: Connection, chunk: Chunk) -> pd.DataFrame:
    """Events of the chunk's projects: event_id, project_id, occurred_at, kind.

    Found project by project through the events' `project_id` index (`through_indexes`):
    joined by hashing, every chunk would read every project's events, all of the
    platform's history (at 1M projects, 43 ms a chunk for 337k events). The chunk's
    lifecycle is built from all of them at once, so they are fetched in one go, as
    `read_projects`."""
    stmt = (
        _event_columns(conn)
        .join(projects, projects.c.project_id == project_events.c.project_id)
        .where(chunk.clause(projects.c.account_id))
    )
    with through_indexes(conn):
        return read_frame(conn, stmt, timestamps=["occurred_at"], aggregate=True)


def read_orphan_events(conn: Connection) -> pd.DataFrame:
    """Events naming a project that does not exist."""
    stmt = (
        _event_columns(conn)
        .outerjoin(projects, projects.c.project_id == project_events.c.project_id)
        .where(projects.c.project_id.is_(None))
    )
    return read_frame(conn, stmt, timestamps=["occurred_at"])


def read_compute_rejects(
    conn: Connection, start: datetime, end: datetime, of: Sequence[str] | None = None, *, unknown: bool = True
) -> pd.DataFrame:
    """Compute rows in [start, end) that cannot count: usage_id, project_id, occurred_at, reason, value.

    of: of the known projects, only these may hold rows with bad amounts (what a
    month-end's chunks counted, `jobs.compute.SourceTally`): their rows are looked up
    through the project index, not the whole range; and `unknown` says whether the
    range may hold rows of projects that do not exist, to be searched for. Without
    `of`, every row of the range is checked, unknown projects included.
    """
    c = compute_usage.c
    in_range = (
        raw(conn, c.occurred_at) >= ts_param(conn, start),
        raw(conn, c.occurred_at) < ts_param(conn, end),
    )
    bad = not_(usable_amount(c.credits, signed=True))
    columns = [c.usage_id, c.project_id, raw(conn, c.occurred_at).label("occurred_at")]
    value = cast(c.credits, String).label("value")
    if of is None:
        named = _unknown_projects(c.project_id, in_range)
        why = case((c.project_id.in_(named), UNKNOWN_PROJECT), else_=amount_problem(conn, c.credits))
        stmt = select(*columns, why.label("reason"), value).where(
            *in_range, or_(bad, c.project_id.in_(named))
        )
        return read_frame(conn, stmt, timestamps=["occurred_at"])
    statements = _of_projects(
        [*columns, value], c.project_id, in_range, bad, amount_problem(conn, c.credits), of, unknown
    )
    names = ["usage_id", "project_id", "occurred_at", "reason", "value"]
    return _frames(conn, statements, names, timestamps=["occurred_at"])


def _of_projects(
    columns: Sequence[ColumnElement[Any]],
    project_id: ColumnElement[Any],
    in_range: Sequence[ColumnElement[bool]],
    bad: ColumnElement[bool],
    problem: ColumnElement[Any],
    of: Sequence[str],
    unknown: bool,
) -> list[Select[Any]]:
    """A reject read's statements with `of`: the bad rows of those projects (`problem`
    their reason), then (`unknown`) every row of the projects that do not exist."""
    statements = []
    if of:
        where = (*in_range, among(project_id, list(of)), bad)
        statements.append(select(*columns, problem.label("reason")).where(*where))
    if unknown:
        named = _unknown_projects(project_id, in_range)
        reason = literal(UNKNOWN_PROJECT, String).label("reason")
        statements.append(select(*columns, reason).where(*in_range, project_id.in_(named)))
    return statements


def _frames(
    conn: Connection,
    statements: Sequence[Select[Any]],
    columns: Sequence[str],
    *,
    timestamps: Sequence[str] = (),
    dates: Sequence[str] = (),
) -> pd.DataFrame:
    """The rows of a few reads of the same columns, one after another."""
    parts = [read_frame(conn, stmt, timestamps=timestamps, dates=dates) for stmt in statements]
    parts = [part for part in parts if len(part)]
    if not parts:
        return _no_rows(columns)
    return parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)


def _no_rows(columns: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series([], dtype=object) for name in columns})


def _unknown_projects(project_id: ColumnElement[Any], where: Sequence[ColumnElement[bool]]) -> Select[Any]:
    """The project ids of the usage rows `where` selects that name no project.

    The distinct ids first (the usage index in order), then each looked up once: a
    lookup per row, through a join, cost the whole month's rows as many lookups.
    """
    named = select(project_id.label("project_id")).where(*where).distinct().subquery()
    known = select(projects.c.project_id).where(projects.c.project_id == named.c.project_id).exists()
    return select(named.c.project_id).where(~known)


def _quantity_problem(conn: Connection) -> ColumnElement[Any]:
    c = cloud_usage.c
    return case(
        (c.metric.not_in(list(LINE_TYPES)), UNKNOWN_METRIC),
        else_=amount_problem(conn, c.quantity),
    )


# A row of `day_pairs` on PostgreSQL: one 64-bit integer, key * 2**52 + value. Keys are
# 0..KEYS-1 (the top bit stays the sign's); values are within MAX_AMOUNT units either
# way (below 2**51), as `usable_amount` lets through.
KEY_SHIFT = 52
KEYS = 2048


def day_pairs(conn: Connection, key: ColumnElement[int], value: ColumnElement[int]) -> ColumnElement[Any]:
    """An aggregate: the group's rows as (key, value) integers in one value per group,
    read back by `pairs_of` (a key is a small number: the day's offset in the window
    read, or a metric's and a day's together; a value, exact units).

    PostgreSQL: each row one 64-bit integer (`KEY_SHIFT`) in 8 bytes (`int8send`), the
    group's rows one bytea: no number is spelled in decimal or parsed back. SQLite:
    one text of `key value` pairs (`rules.int_texts`). One value per group costs a
    fraction of a row object per row."""
    if conn.dialect.name == "postgresql":
        packed = cast(key, BigInteger) * literal(2**KEY_SHIFT, BigInteger) + cast(value, BigInteger)
        return func.string_agg(func.int8send(packed), literal(b"", LargeBinary))
    return func.group_concat(cast(key, String) + literal(" ") + cast(value, String), literal(" "))


def pairs_of(values: Sequence[Any], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The (key, value) of every row of `day_pairs`' groups, in the groups' order;
    `rows` is how many the groups counted."""
    if values and isinstance(values[0], bytes | bytearray | memoryview):
        raw = b"".join(values)
        if len(raw) != 8 * rows:
            raise AssertionError(f"day pairs: {len(raw)} bytes read for {rows} rows")
        packed = np.frombuffer(raw, dtype=">i8").astype(np.int64)
        key = (packed + (1 << (KEY_SHIFT - 1))) >> KEY_SHIFT
        return key, packed - (key << KEY_SHIFT)
    flat = integers(" ".join(values))
    if len(flat) != 2 * rows:
        raise AssertionError(f"day pairs: {len(flat)} numbers read for {rows} rows")
    pairs = flat.reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


def summed_pairs(
    counts: np.ndarray, key: np.ndarray, value: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of groups (group i holds the next counts[i] rows) summed per group and key:
    the group of each result, its key, the sum of its values; in the order of group,
    then key."""
    if len(key) != counts.sum():
        raise AssertionError(f"day pairs: {len(key)} read, {counts.sum()} counted")
    group = np.repeat(np.arange(len(counts)), counts)
    if len(group):
        ordered = (group[1:] > group[:-1]) | (group[1:] == group[:-1]) & (key[1:] >= key[:-1])
        if not bool(ordered.all()):
            order = np.lexsort((key, group))
            group, key, value = group[order], key[order], value[order]
        new = (group[1:] != group[:-1]) | (key[1:] != key[:-1])
        starts = np.flatnonzero(np.r_[True, new])
        group, key, value = group[starts], key[starts], np.add.reduceat(value, starts)
    return group, key, value


METRICS = list(LINE_TYPES)  # a metric's number in the texts of `read_cloud_usage`: its index
DAYS_PER_METRIC = KEYS // len(METRICS)  # a row's key in `read_cloud_usage`: metric * this + day offset


def read_cloud_usage(conn: Connection, first: date, last: date, chunk: Chunk) -> pd.DataFrame:
    """`read_cloud_tallied`'s sums alone."""
    return read_cloud_tallied(conn, first, last, chunk).frame


@dataclass(frozen=True)
class CloudUsage:
    frame: pd.DataFrame  # project_id, day, metric, quantity_units
    seen: int  # the rows read, usable or not (`SourceTally`)
    unusable: tuple[str, ...]  # the projects with a row that cannot be billed whatever their state


def read_cloud_tallied(conn: Connection, first: date, last: date, chunk: Chunk) -> CloudUsage:
    """Usable cloud rows of the chunk's projects summed per (project_id, day, metric):
    project_id, day, metric, quantity_units.

    One row comes back per project, its rows as (key, quantity) pairs (`day_pairs`: the
    key is the metric's number times DAYS_PER_METRIC plus the day's offset from
    `first`; the quantity exact units); numpy turns them into columns and sums the rows
    of a metric and day. A chunk's published
    projects have a row per metric and day: a row object per day, or a second grouping
    in the database, cost more than the sum itself; grouped by project alone, the rows
    are aggregated in the index's order (by project and metric, the database sorts each
    project's rows first: about a quarter of the statement at 100k projects, on both
    back ends). The projects are named through the chunk's accounts in a subquery, so
    the usage is read in the index's project order.

    The read counts every row of the days too, usable or not, and names the projects
    with a row no state could bill (`usable_groups`): what a month-end's rejects are
    found from (`jobs.compute.source_rejects`).
    """
    c = cloud_usage.c
    if (last - first).days >= DAYS_PER_METRIC:
        raise ValueError(f"cloud usage is read {DAYS_PER_METRIC} days at most at a time, not {first}..{last}")
    in_chunk = select(projects.c.project_id).where(chunk.clause(projects.c.account_id))
    metric = case(
        *((c.metric == name, literal(number * DAYS_PER_METRIC)) for number, name in enumerate(METRICS))
    )
    base = number_of(first)
    offset = day_number(conn, c.usage_date, since=first)
    # The key is NULL for an unknown metric, and so is the row's pair: the pair's own
    # test is of the quantity alone (each test of a row costs, once per row read).
    quantity = case((usable_amount(c.quantity, signed=False), units(conn, c.quantity)), else_=None)
    usable = and_(c.metric.in_(METRICS), usable_amount(c.quantity, signed=False))
    stmt = (
        select(
            c.project_id, *tallies(conn, usable), day_pairs(conn, metric + offset, quantity).label("triples")
        )
        .where(
            c.project_id.in_(in_chunk),
            raw(conn, c.usage_date) >= date_param(conn, first),
            raw(conn, c.usage_date) <= date_param(conn, last),
        )
        .group_by(c.project_id)
    )
    with through_indexes(conn):
        groups = read_frame(conn, stmt, ints=["seen", "rows"], aggregate=True)
    seen, unusable, groups = usable_groups(groups, "triples")
    counts = groups["rows"].to_numpy(dtype=np.int64)
    group, key, amount = summed_pairs(counts, *pairs_of(groups["triples"].tolist(), int(counts.sum())))
    frame = pd.DataFrame(
        {
            "project_id": groups["project_id"].to_numpy(dtype=object)[group],
            "day": key % DAYS_PER_METRIC + base,
            "metric": np.array(METRICS, dtype=object)[key // DAYS_PER_METRIC],
            "quantity_units": amount,
        }
    )
    return CloudUsage(frame, seen, unusable)


def tallies(conn: Connection, usable: ColumnElement[bool]) -> list[ColumnElement[Any]]:
    """A usage read's counts per group, beside its `day_pairs` (which hold the usable
    rows only): `seen`, every row; on SQLite `rows`, the usable ones. PostgreSQL's
    pairs are 8 bytes each, so their length tells `usable_groups` how many there are,
    and no row is tested twice."""
    seen = func.count().label("seen")
    if conn.dialect.name == "postgresql":
        return [seen]
    return [seen, func.count(case((usable, 1), else_=None)).label("rows")]


def usable_groups(groups: pd.DataFrame, pairs: str) -> tuple[int, tuple[str, ...], pd.DataFrame]:
    """Of a usage read's groups (project_id, `tallies`, and their `day_pairs` in column
    `pairs`): every row seen, the projects with a row that cannot count, and the groups
    with a usable row (a group without one has no pairs), with `rows` counted."""
    seen = groups["seen"].to_numpy(dtype=np.int64)
    if "rows" in groups:
        rows = groups["rows"].to_numpy(dtype=np.int64)
    else:
        sizes = [0 if value is None else len(value) for value in groups[pairs].tolist()]
        rows = np.array(sizes, dtype=np.int64) // 8
        groups = groups.assign(rows=rows)
    bad = seen != rows
    unusable = tuple(groups["project_id"].to_numpy(dtype=object)[bad].tolist())
    if bool(bad.any()) and not bool(rows.all()):
        groups = groups.loc[rows > 0].reset_index(drop=True)
    return int(seen.sum()), unusable, groups


def read_cloud_rejects(
    conn: Connection, first: date, last: date, of: Sequence[str] | None = None, *, unknown: bool = True
) -> pd.DataFrame:
    """Cloud rows that cannot be billed whatever the project's state.

    of, unknown: as for `read_compute_rejects` (an unknown metric, a missing, bad or
    negative quantity).
    """
    c = cloud_usage.c
    problem = _quantity_problem(conn)
    in_range = (
        raw(conn, c.usage_date) >= date_param(conn, first),
        raw(conn, c.usage_date) <= date_param(conn, last),
    )
    bad = not_(and_(c.metric.in_(list(LINE_TYPES)), usable_amount(c.quantity, signed=False)))
    columns = [c.usage_id, c.project_id, raw(conn, c.usage_date).label("day"), c.metric]
    value = cast(c.quantity, String).label("value")
    if of is None:
        named = _unknown_projects(c.project_id, in_range)
        why = case(
            (c.project_id.in_(named), UNKNOWN_PROJECT), (problem.is_not(None), problem), else_=NEGATIVE
        )
        stmt = select(*columns, why.label("reason"), value).where(
            *in_range, or_(bad, c.project_id.in_(named))
        )
        return read_frame(conn, stmt, dates=["day"])
    reason = case((problem.is_not(None), problem), else_=NEGATIVE)
    statements = _of_projects([*columns, value], c.project_id, in_range, bad, reason, of, unknown)
    names = ["usage_id", "project_id", "day", "metric", "reason", "value"]
    return _frames(conn, statements, names, dates=["day"])


def usage_rows(conn: Connection, start: datetime, end: datetime, first: date, last: date) -> tuple[int, int]:
    """How many compute rows [start, end) and cloud rows of days first..last there are,
    usable or not, of any project (through the usage tables' time indexes alone)."""
    cu, cl = compute_usage.c, cloud_usage.c
    compute = (
        select(func.count())
        .select_from(compute_usage)
        .where(
            raw(conn, cu.occurred_at) >= ts_param(conn, start),
            raw(conn, cu.occurred_at) < ts_param(conn, end),
        )
    )
    cloud = (
        select(func.count())
        .select_from(cloud_usage)
        .where(
            raw(conn, cl.usage_date) >= date_param(conn, first),
            raw(conn, cl.usage_date) <= date_param(conn, last),
        )
    )
    return int(conn.execute(compute).scalar_one()), int(conn.execute(cloud).scalar_one())


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
            c.metric.in_(list(LINE_TYPES)),
            usable_amount(c.quantity, signed=False),
        )
        parts.append(read_frame(conn, stmt, dates=["day"]))
    rows = pd.concat(parts, ignore_index=True)
    return rows.merge(groups[["project_id", "day", "metric"]], on=["project_id", "day", "metric"])


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of at most `size` items (for IN lists of bounded length)."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


def stored_charges(conn: Connection, month: Month, chunk: Chunk) -> pd.DataFrame:
    """The month's stored charges of the chunk's accounts, summed per (account, project,
    charge type) and named as invoice lines (a charge type is its line type). A period
    counts its days: a run its daily quantity and amount times their number, a month
    form its totals."""
    cp = charge_periods.c
    times = case((cp.daily.is_(None), cp.days), else_=1)
    stmt = (
        select(
            cp.account_id,
            cp.project_id,
            cp.charge_type.label("line_type"),
            cast(func.sum(cp.quantity_units * times), BigInteger).label("quantity_units"),
            cast(func.sum(cp.amount_units * times), BigInteger).label("amount_units"),
        )
        .where(chunk.clause(cp.account_id), cp.first_day.between(month.first_day, month.last_day))
        .group_by(cp.account_id, cp.project_id, cp.charge_type)
    )
    return read_frame(conn, stmt, ints=["quantity_units", "amount_units"], aggregate=True)
