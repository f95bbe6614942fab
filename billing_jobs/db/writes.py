"""Writes to the jobs' own tables: in bulk, idempotent, inside the caller's transaction."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import (
    Connection,
    DateTime,
    Table,
    Text,
    and_,
    bindparam,
    delete,
    or_,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite

from billing_jobs.db.billing_tables import charge_months, charge_periods, rejects
from billing_jobs.db.engine import through_indexes
from billing_jobs.db.reads import date_param, read_frame
from billing_jobs.db.reads import day_number as day_number_of
from billing_jobs.db.reject_log import reopen_found
from billing_jobs.db.sql import Chunk, among, array_text
from billing_jobs.frames import pd
from billing_jobs.phases import phase
from billing_jobs.rules import periods
from billing_jobs.rules.calendar import Month, day_from_number, day_number
from billing_jobs.rules.invoice import STORAGE_FEE
from billing_jobs.rules.rejects import RejectStatus, reject_id

SQL_BATCH = 5_000
DELETE_BATCH = 50_000  # rows per PostgreSQL statement of `delete_periods` (sent as arrays)
COPY_BLOCK = 200_000


def _column_values(values: pd.Series, *, is_date: bool, is_timestamp: bool) -> list[Any]:
    """One column as plain Python values: day numbers become ISO dates, instants ISO text."""
    if is_date:
        days = values.to_numpy(dtype=np.int64).astype("datetime64[D]")
        iso: list[Any] = np.datetime_as_string(days, unit="D").tolist()
        return iso
    if values.dtype.kind == "M":
        text = np.datetime_as_string(values.to_numpy().astype("datetime64[us]"), unit="us")
        return [None if t == "NaT" else t.replace("T", " ") for t in text.tolist()]
    if values.dtype.kind in "iub":
        plain: list[Any] = values.tolist()
        return plain
    out: list[Any] = values.tolist()
    missing = values.isna().to_numpy()
    if missing.any():  # else the values as they are (most id and text columns)
        out = [None if m else v for v, m in zip(out, missing, strict=True)]
    if is_timestamp:
        out = [v.strftime("%Y-%m-%d %H:%M:%S.%f") if isinstance(v, datetime) else v for v in out]
    return out


_COPY_SPECIALS = re.compile(r"[\\\t\n\r]")
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_field_texts(values: list[Any]) -> list[str]:
    """One column's fields in PostgreSQL's COPY text format: \\N for NULL, and a
    backslash, tab, newline or carriage return escaped (one search over the whole
    column first: ids and codes rarely hold any)."""
    kinds = set(map(type, values))
    if kinds <= {int}:
        return list(map(str, values))  # digits and a sign: nothing to escape, no NULL
    texts = (
        values
        if kinds <= {str}
        else [v if isinstance(v, str) else "" if v is None else str(v) for v in values]
    )
    if _COPY_SPECIALS.search("".join(texts)):
        texts = [t.translate(_COPY_ESCAPES) for t in texts]
    if type(None) in kinds:
        texts = ["\\N" if v is None else t for v, t in zip(values, texts, strict=True)]
    return texts


def _copy_text(columns: list[list[Any]]) -> str:
    """Rows in PostgreSQL's COPY text format (tab-separated, one line per row)."""
    fields = [_copy_field_texts(values) for values in columns]
    return "\n".join(map("\t".join, zip(*fields, strict=True))) + "\n" if fields and fields[0] else ""


def bulk_insert(conn: Connection, table: Table, rows: pd.DataFrame, date_columns: Sequence[str] = ()) -> int:
    """Insert a DataFrame whose columns are columns of `table`.

    PostgreSQL: COPY in blocks of text made by pandas (no Python call per row).
    SQLite: the driver's executemany over tuples. `date_columns` hold day numbers.
    """
    if rows.empty:
        return 0
    columns = list(rows.columns)
    names = ", ".join(f'"{c}"' for c in columns)
    data = {
        c: _column_values(
            rows[c], is_date=c in date_columns, is_timestamp=isinstance(table.c[c].type, DateTime)
        )
        for c in columns
    }
    raw = conn.connection.driver_connection
    assert raw is not None, "an open connection has a driver connection"
    if conn.dialect.name == "postgresql":
        with raw.cursor() as cur, cur.copy(f'COPY "{table.name}" ({names}) FROM STDIN') as copy:
            for start in range(0, len(rows), COPY_BLOCK):
                copy.write(_copy_text([values[start : start + COPY_BLOCK] for values in data.values()]))
        return len(rows)
    marks = ", ".join("?" for _ in columns)
    cur = raw.cursor()
    try:
        cur.executemany(
            f'INSERT INTO "{table.name}" ({names}) VALUES ({marks})', zip(*data.values(), strict=True)
        )
    finally:
        cur.close()
    return len(rows)


ANALYZE_SHARE = 0.1  # PostgreSQL's own autovacuum_analyze_scale_factor


def analyze(conn: Connection, *tables: Table, changed: int | None = None) -> int:
    """Refresh the planner's statistics after a large write (PostgreSQL); returns how
    many tables were analyzed.

    changed: rows the run wrote to each table. A table whose statistics already count
    ten times as many rows is left to autovacuum: a night's charges are a small part
    of a month's, and analyzing a large table costs seconds.
    """
    if conn.dialect.name != "postgresql":
        return 0
    done = 0
    for table in tables:
        if changed is not None:
            counted = conn.execute(
                text("SELECT reltuples FROM pg_class WHERE oid = to_regclass(:name)"), {"name": table.name}
            ).scalar()
            if counted is not None and counted >= 0 and changed < ANALYZE_SHARE * counted:
                continue
        conn.exec_driver_sql(f'ANALYZE "{table.name}"')
        done += 1
    return done


def insert_ignore(conn: Connection, table: Table, records: list[dict[str, Any]]) -> int:
    """Insert rows whose key is not there yet; returns how many were new."""
    if not records:
        return 0
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    key = next(iter(table.primary_key.columns))
    stmt = dialect.insert(table).on_conflict_do_nothing().returning(key)
    added = 0
    for start in range(0, len(records), SQL_BATCH):
        added += len(conn.execute(stmt, records[start : start + SQL_BATCH]).all())
    return added


@dataclass(frozen=True)
class Window:
    """The days a run decides, per charge type: days first..last, and for the storage
    fee first..storage_last (the nightly job's storage fee runs to the month's end)."""

    first: date
    last: date
    storage_last: date

    @classmethod
    def days(cls, first: date, last: date, storage_last: date | None = None) -> Window:
        return cls(first, last, storage_last or last)

    @property
    def through(self) -> date:
        """The last day the window decides, any charge type."""
        return max(self.last, self.storage_last)

    def bounds(self, charge_types: pd.Series) -> tuple[np.ndarray, np.ndarray]:
        storage = (charge_types == STORAGE_FEE).to_numpy(dtype=bool)
        lo = np.full(len(charge_types), day_number(self.first), dtype=np.int64)
        hi = np.where(storage, day_number(self.storage_last), day_number(self.last)).astype(np.int64)
        return lo, hi


def charges_stored(conn: Connection, month: Month) -> bool:
    """Whether `month` may hold stored periods (`charge_months`): read by a run after it
    holds its lock, before it writes its month's row."""
    cm = charge_months.c
    return conn.execute(select(cm.period).where(cm.period == str(month))).first() is not None


def mark_charged(conn: Connection, month: Month, *, run_id: str, now: datetime) -> None:
    """Record that `month` may hold stored periods, before a run writes any (a
    transaction of its own, committed before the chunks' writes)."""
    insert_ignore(conn, charge_months, [{"period": str(month), "run_id": run_id, "recorded_at": now}])


def read_periods(conn: Connection, chunk: Chunk, projects: Sequence[str], lo: date, hi: date) -> pd.DataFrame:
    """The stored periods of one month that a run deciding days lo..hi (both in that
    month) may change: the runs that overlap or touch those days and every month form
    of the month; of the chunk's accounts, and of those of `projects` that the chunk's
    accounts hold no period of in the month, whatever their account (a project that
    moved to the chunk's accounts since the month's last run).

    A project the chunk's accounts already hold periods of was there at that run,
    which moved all of its periods of the days it decided; what its old account may
    still hold of other days is that account's chunk's to delete (chunks are planned
    over the accounts charged in the month too). So a re-close, or any run after the
    first of the month, looks up no project one by one: that lookup goes through the
    primary key's every period of each project, all months, and to the table's rows
    for their accounts."""
    cp = charge_periods.c
    month = Month.of(lo)
    columns = [
        cp.project_id,
        cp.charge_type,
        day_number_of(conn, cp.first_day).label("first_day"),
        day_number_of(conn, cp.last_day).label("last_day"),
        cp.days,
        cp.account_id,
        cp.quantity_units,
        cp.amount_units,
        cp.daily,
    ]
    touches = and_(
        cp.first_day <= date_param(conn, min(hi + timedelta(days=1), month.last_day)),
        cp.last_day >= date_param(conn, max(lo - timedelta(days=1), month.first_day)),
    )
    reach = (
        cp.first_day >= date_param(conn, month.first_day),
        cp.first_day <= date_param(conn, month.last_day),
        or_(cp.daily.is_not(None), touches),
    )
    ints = ["first_day", "last_day", "days", "quantity_units", "amount_units"]
    frames = [
        read_frame(
            conn, select(*columns).where(chunk.clause(cp.account_id), *reach), ints=ints, aggregate=True
        )
    ]
    if chunk.accounts is not None and len(projects):
        held = pd.Index(frames[0]["project_id"].to_numpy(dtype=object))
        unheld = pd.Index(projects, dtype=object).difference(held, sort=False).tolist()
        if unheld:
            # Through the primary key, only other accounts' rows: the chunk's are read above.
            others = ~among(cp.account_id, chunk.accounts)
            moved = select(*columns).where(among(cp.project_id, unheld), others, *reach)
            frames.append(read_frame(conn, moved, ints=ints, aggregate=True))
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def sync_charges(
    conn: Connection,
    wanted: pd.DataFrame,
    window: Window,
    chunk: Chunk,
    *,
    run_id: str,
    now: datetime,
    phases: dict[str, float] | None = None,
    stored: bool = True,
) -> tuple[int, int]:
    """Make the stored charges of the chunk say exactly `wanted` inside `window`.

    wanted: the daily charges the rules give inside the window, for every project of
    the chunk's accounts, in their canonical periods (`rules.periods.from_days`, done
    by the caller before its write transaction: it is the chunk's work, not the
    write's). The stored periods the window can change (the chunk's accounts', and any
    account's of its projects) are read; the change that keeps what lies
    outside the window and holds `wanted` inside it, in canonical form, is computed
    (`rules.periods.change`) and written: the periods it no longer holds deleted, the
    new ones inserted. Over unchanged data the change is empty and nothing is written;
    every day is compared, so any difference is corrected.

    Returns (periods written, periods deleted). phases: `billing_jobs.phases`.
    stored: False when the run found that the window's month holds no periods
    (`charges_stored`, read when it started): nothing is looked up, `wanted` is written.
    """
    if len(wanted):
        lo, hi = window.bounds(wanted["charge_type"])
        f, e = wanted["first_day"].to_numpy(), wanted["last_day"].to_numpy()
        if bool(((f < lo) | (e > hi)).any()):
            raise ValueError("a charge lies outside the days the run decides")
    if Month.of(window.first) != Month.of(window.through):
        raise ValueError("a run of charges spans more than one month")
    if stored:
        projects = pd.unique(wanted["project_id"]).tolist() if len(wanted) else []
        with phase(phases, "stored_read"):
            held = read_periods(conn, chunk, projects, window.first, window.through)
    else:
        held = periods.empty()
    with phase(phases, "diff"):
        lo, hi = window.bounds(held["charge_type"])
        diff = periods.change(held, wanted, lo, hi)
    if diff.empty:
        return 0, 0
    deleted = 0
    if len(diff.delete):
        with phase(phases, "write_delete"):
            deleted = delete_periods(conn, diff.delete)
    rows = diff.insert.assign(run_id=run_id, recorded_at=now)
    if chunk.accounts is not None:
        # Periods of other accounts (the part outside the window of a project that moved
        # here) may be written by their own chunk at the same time: the same rows.
        theirs = ~rows["account_id"].isin(chunk.accounts)
        foreign, rows = rows.loc[theirs], rows.loc[~theirs]
    else:
        foreign = rows.iloc[0:0]
    with phase(phases, "write_insert"):
        written = bulk_insert(conn, charge_periods, rows, date_columns=["first_day", "last_day"])
    if len(foreign):
        records = foreign.assign(
            first_day=[day_from_number(d) for d in foreign["first_day"].tolist()],
            last_day=[day_from_number(d) for d in foreign["last_day"].tolist()],
        ).to_dict("records")
        written += insert_ignore(conn, charge_periods, records)
    return written, deleted


def delete_periods(conn: Connection, rows: pd.DataFrame) -> int:
    """Delete stored periods, each only if it is still exactly as read (every column
    compared); returns how many were deleted. A row already gone was deleted by a chunk
    of the same run at the same time (a project that moved between accounts): both
    want it gone.

    PostgreSQL: one statement per batch, the rows sent as arrays, each looked up through
    an index (a statement per row costs a round trip each; a hash join, which the
    planner prefers for a large batch, reads the whole table per batch, so it and the
    merge join are off for these statements). SQLite: the driver's executemany, in
    process.
    """
    columns = {
        "p": rows["project_id"].tolist(),
        "t": rows["charge_type"].tolist(),
        "f": rows["first_day"].to_numpy(dtype=np.int64),
        "e": rows["last_day"].to_numpy(dtype=np.int64),
        "a": rows["account_id"].tolist(),
        "q": rows["quantity_units"].tolist(),
        "m": rows["amount_units"].tolist(),
        "d": rows["daily"].astype(object).where(rows["daily"].notna(), None).tolist(),
    }
    cp = charge_periods.c
    deleted = 0
    if conn.dialect.name == "postgresql":
        # Each column as one array text where it can be (`db.sql.array_text`): the
        # driver would dump the lists element by element in Python.
        for day in ("f", "e"):  # day numbers as ISO dates, a column at a time
            columns[day] = np.datetime_as_string(columns[day].astype("datetime64[D]")).tolist()
        dumped = {k: _array_or_list(v) for k, v in columns.items()}
        arrays = text(
            "DELETE FROM charge_periods AS cp USING unnest("
            "CAST(:p AS TEXT[]), CAST(:t AS TEXT[]), CAST(:f AS DATE[]), CAST(:e AS DATE[]), "
            "CAST(:a AS TEXT[]), CAST(:q AS BIGINT[]), CAST(:m AS BIGINT[]), CAST(:d AS TEXT[])"
            ") AS x(p, t, f, e, a, q, m, d) "
            "WHERE cp.project_id = x.p AND cp.charge_type = x.t AND cp.first_day = x.f "
            "AND cp.last_day = x.e AND cp.account_id = x.a AND cp.quantity_units = x.q "
            "AND cp.amount_units = x.m AND cp.daily IS NOT DISTINCT FROM x.d"
        )
        # Each row found through an index, whatever the batch's size: a hash join would
        # read the whole table (every month's periods) once per batch.
        with through_indexes(conn):
            for start in range(0, len(rows), DELETE_BATCH):
                part = {k: v[start // DELETE_BATCH] for k, v in dumped.items()}
                deleted += conn.execute(arrays, part).rowcount or 0
        return deleted
    for day in ("f", "e"):
        columns[day] = [day_from_number(d) for d in columns[day].tolist()]
    stmt = delete(charge_periods).where(
        cp.project_id == bindparam("p"),
        cp.charge_type == bindparam("t"),
        cp.first_day == bindparam("f"),
        cp.last_day == bindparam("e"),
        cp.account_id == bindparam("a"),
        cp.quantity_units == bindparam("q"),
        cp.amount_units == bindparam("m"),
        cp.daily.is_not_distinct_from(bindparam("d", type_=Text)),
    )
    params = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
    for start in range(0, len(params), SQL_BATCH):
        deleted += conn.execute(stmt, params[start : start + SQL_BATCH]).rowcount or 0
    return deleted


def _array_or_list(values: list[Any]) -> list[Any]:
    """A column's batches (of DELETE_BATCH values) as array texts, or as lists where
    a text cannot hold them."""
    batches = [values[start : start + DELETE_BATCH] for start in range(0, len(values), DELETE_BATCH)]
    return [array_text(batch) or batch for batch in batches]


def record_rejects(conn: Connection, found: pd.DataFrame, *, run_id: str, now: datetime) -> int:
    """Store rejected source rows (source_table, source_id, reason, project_id, period, detail).

    A row already recorded with the same reason is left as it is, except that one a run
    had closed is open again (`reject_log.reopen_found`); returns how many are new.
    """
    if found.empty:
        return 0
    rows = found[["source_table", "source_id", "reason", "project_id", "period", "detail"]].drop_duplicates(
        ["source_table", "source_id", "reason"]
    )
    ids = [
        reject_id(t, str(s), r)
        for t, s, r in zip(rows["source_table"], rows["source_id"], rows["reason"], strict=True)
    ]
    reopen_found(conn, ids, run_id=run_id, now=now)
    records = rows.assign(
        first_run_id=run_id, first_seen_at=now, status=RejectStatus.OPEN.value, reject_id=ids
    ).to_dict("records")
    return insert_ignore(conn, rejects, records)
