"""Writes to the jobs' own tables: in bulk, idempotent, inside the caller's transaction."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import date, datetime
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Date,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    delete,
    exists,
    func,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from billing_jobs.db.billing_tables import daily_charges, rejects
from billing_jobs.db.reads import Chunk
from billing_jobs.db.reject_log import reopen_found
from billing_jobs.rules.rejects import RejectStatus, reject_id

SQL_BATCH = 5_000
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
    missing = values.isna().to_numpy()
    out = [None if m else v for v, m in zip(values.tolist(), missing, strict=True)]
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


def sync_daily_charges(
    conn: Connection,
    truth: pd.DataFrame,
    first: date,
    last: date,
    chunk: Chunk,
    *,
    run_id: str,
    now: datetime,
) -> tuple[int, int]:
    """Make the stored charges of days first..last of the chunk equal `truth`, exactly.

    truth: project_id, account_id, charge_type, day, quantity_units, amount_units, for
    every project of the chunk's accounts. It goes to a temporary table as runs of
    days; then, in the database:

    1. every stored row of the chunk's accounts in those days that no truth row
       equals on every column is deleted;
    2. the truth rows not stored yet are inserted: all of them with a plain INSERT
       when none is stored (a first close), none when all are (a re-run);
    3. only if a truth row's key (project, charge type, day) turned out to be stored
       with other values (a project that moved here from another account), those
       rows are deleted and the missing truth rows inserted.

    Counts first (stored rows of the chunk's accounts in those days; of them, the
    ones equal to the truth) tell which of these passes can change anything: over
    unchanged data none runs, and with nothing stored the truth is inserted as it is.

    Nothing is compared by a summary, so any difference on any day is corrected; a
    re-run over unchanged data writes nothing. Returns (rows written, rows deleted).
    """
    runs = to_runs(truth) if len(truth) else None
    if runs is not None and int(runs["n_days"].max()) > 31:
        raise ValueError("a run of charges spans more than one month")
    dialect = conn.dialect.name
    truth_runs.create(conn)
    try:
        if runs is not None:
            bulk_insert(
                conn,
                truth_runs,
                runs.assign(last_day=runs["first_day"] + runs["n_days"] - 1),
                date_columns=["first_day", "last_day"],
            )
        dc, r = daily_charges.c, truth_runs.c
        in_scope = (chunk.clause(dc.account_id), dc.charge_date >= first, dc.charge_date <= last)
        stored = int(
            conn.execute(select(func.count()).select_from(daily_charges).where(*in_scope)).scalar_one()
        )
        wanted = int(runs["n_days"].sum()) if runs is not None else 0
        joined = False

        def join_ready() -> None:
            # The index and statistics only the joins below need: a first close skips them.
            nonlocal joined
            if not joined:
                conn.execute(text(_TRUTH_INDEX))
                if dialect == "postgresql":
                    conn.exec_driver_sql("ANALYZE billing_truth_runs")
                joined = True

        # Counts decide which passes are needed. Every stored row equal to a truth row is
        # in scope (the truth holds the chunk's accounts and days first..last), so with
        # nothing stored in scope nothing is kept; a re-run over unchanged data (every
        # stored row equal to the truth, nothing else stored) needs no other pass.
        kept = 0
        if stored and wanted:
            join_ready()
            kept = int(conn.execute(text(_COUNT_EQUAL)).scalar_one())
        deleted = 0
        if stored > kept:
            # Stored rows of the chunk's accounts that no truth row equals.
            equal = exists().where(
                r.project_id == dc.project_id,
                r.charge_type == dc.charge_type,
                dc.charge_date >= r.first_day,
                dc.charge_date <= r.last_day,
                r.account_id == dc.account_id,
                r.quantity_units == dc.quantity_units,
                r.amount_units == dc.amount_units,
            )
            if wanted:
                join_ready()
            deleted += conn.execute(delete(daily_charges).where(*in_scope, ~equal)).rowcount or 0
        written = 0
        if kept < wanted:
            stamp = now.strftime("%Y-%m-%d %H:%M:%S.%f") if dialect == "sqlite" else now
            params = {"run_id": run_id, "now": stamp}

            def insert(missing_only: bool) -> int:
                sql = _EXPAND[dialect] + (_MISSING[dialect] if missing_only else "")
                if missing_only:
                    join_ready()
                return conn.execute(text(sql), params).rowcount or 0

            # None kept (a first close): a plain insert; some: only the missing ones. Rows
            # still stored on the truth's keys can only be other accounts' (a project that
            # moved here): the plain insert then fails on the key, the other inserts fewer
            # rows than are missing. Only then are those rows found and removed (a join
            # driven by the truth through daily_charges' primary key) and the rest inserted.
            try:
                with _undo_on_error(conn):
                    written = insert(missing_only=kept > 0)
                complete = written == wanted - kept
            except IntegrityError:
                written, complete = 0, False
            if not complete:
                join_ready()
                deleted += conn.execute(text(_DELETE_COVERED_DIFFERENT[dialect])).rowcount or 0
                written += insert(missing_only=True)
    finally:
        # SQLite may have committed the CREATE on its own: drop it even after an error. On
        # PostgreSQL an error aborts the transaction, whose rollback removes the table.
        if dialect != "postgresql":
            truth_runs.drop(conn)
    if dialect == "postgresql":
        truth_runs.drop(conn)
    return written, deleted


@contextmanager
def _undo_on_error(conn: Connection) -> Iterator[None]:
    """A statement that fails leaves the transaction usable: on PostgreSQL through a
    savepoint; SQLite undoes only the failed statement (its ABORT conflict resolution)."""
    if conn.dialect.name == "postgresql":
        with conn.begin_nested():
            yield
    else:
        yield


_TRUTH_INDEX = "CREATE INDEX billing_truth_runs_key ON billing_truth_runs (project_id, charge_type)"

# The truth of a chunk's charges, as runs of consecutive days with the same amount.
truth_runs = Table(
    "billing_truth_runs",
    MetaData(),
    Column("project_id", String(64)),
    Column("charge_type", String(32)),
    Column("first_day", Date),
    Column("n_days", Integer),
    Column("account_id", String(64)),
    Column("quantity_units", BigInteger),
    Column("amount_units", BigInteger),
    Column("last_day", Date),
    prefixes=["TEMPORARY"],
)

_COLUMNS = (
    "INSERT INTO daily_charges (project_id, charge_type, charge_date, account_id, quantity_units,"
    " amount_units, run_id, recorded_at)"
)
_DAY = {"postgresql": "r.first_day + g.n", "sqlite": "date(r.first_day, '+' || g.n || ' days')"}
_EXPAND = {
    "postgresql": (
        _COLUMNS + " SELECT r.project_id, r.charge_type, r.first_day + g.n, r.account_id, r.quantity_units,"
        " r.amount_units, :run_id, :now"
        " FROM billing_truth_runs r CROSS JOIN LATERAL generate_series(0, r.n_days - 1) AS g(n)"
    ),
    # The WITH inside the INSERT: sqlite3 counts rows only for statements starting with INSERT.
    "sqlite": (
        _COLUMNS + " WITH RECURSIVE g(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM g WHERE n < 30)"
        " SELECT r.project_id, r.charge_type, date(r.first_day, '+' || g.n || ' days'), r.account_id,"
        " r.quantity_units, r.amount_units, :run_id, :now"
        " FROM billing_truth_runs r JOIN g ON g.n < r.n_days"
    ),
}
_MISSING = {
    name: " WHERE NOT EXISTS (SELECT 1 FROM daily_charges d WHERE d.project_id = r.project_id"
    f" AND d.charge_type = r.charge_type AND d.charge_date = {day})"
    for name, day in _DAY.items()
}
# Stored rows on the keys of the truth's runs, found from the runs (a join driven by the
# small temporary table through daily_charges' primary key).
_ON_COVERED = (
    " d.project_id = r.project_id AND d.charge_type = r.charge_type"
    " AND d.charge_date >= r.first_day AND d.charge_date <= r.last_day"
)
_DIFFERENT = (
    " (r.account_id <> d.account_id OR r.quantity_units <> d.quantity_units"
    " OR r.amount_units <> d.amount_units)"
)
_DELETE_COVERED_DIFFERENT = {
    "postgresql": "DELETE FROM daily_charges d USING billing_truth_runs r WHERE"
    + _ON_COVERED
    + " AND"
    + _DIFFERENT,
    "sqlite": (
        "DELETE FROM daily_charges WHERE rowid IN (SELECT d.rowid FROM billing_truth_runs r"
        " JOIN daily_charges d ON" + _ON_COVERED + " WHERE" + _DIFFERENT + ")"
    ),
}
_COUNT_EQUAL = (
    "SELECT count(*) FROM billing_truth_runs r JOIN daily_charges d ON"
    + _ON_COVERED
    + " AND r.account_id = d.account_id AND r.quantity_units = d.quantity_units"
    " AND r.amount_units = d.amount_units"
)


def to_runs(rows: pd.DataFrame) -> pd.DataFrame:
    """Charges (project_id, account_id, charge_type, day, quantity_units, amount_units)
    as runs of consecutive days with equal quantity and amount: ..., first_day, n_days."""
    # Sorted codes: the runs (and the rows the database expands from them) come in key order.
    pcode, _ = pd.factorize(rows["project_id"], sort=True)
    tcode, _ = pd.factorize(rows["charge_type"], sort=True)
    day = rows["day"].to_numpy(dtype=np.int64)
    order = np.lexsort((day, tcode, pcode))
    p, t, d = pcode[order], tcode[order], day[order]
    q = rows["quantity_units"].to_numpy(dtype=np.int64)[order]
    a = rows["amount_units"].to_numpy(dtype=np.int64)[order]
    start = np.ones(len(order), dtype=bool)
    start[1:] = (
        (p[1:] != p[:-1]) | (t[1:] != t[:-1]) | (d[1:] != d[:-1] + 1) | (q[1:] != q[:-1]) | (a[1:] != a[:-1])
    )
    first = np.flatnonzero(start)
    n_days = np.diff(np.append(first, len(order)))
    picked = order[first]
    return pd.DataFrame(
        {
            "project_id": rows["project_id"].to_numpy(dtype=object)[picked],
            "charge_type": rows["charge_type"].to_numpy(dtype=object)[picked],
            "first_day": d[first],
            "n_days": n_days,
            "account_id": rows["account_id"].to_numpy(dtype=object)[picked],
            "quantity_units": q[first],
            "amount_units": a[first],
        }
    )


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
