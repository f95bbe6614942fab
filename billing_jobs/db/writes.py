"""Writes to the jobs' own tables: in bulk, idempotent, inside the caller's transaction."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from datetime import datetime
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
    text,
)
from sqlalchemy.dialects import postgresql, sqlite

from billing_jobs.db.billing_tables import daily_charges, rejects
from billing_jobs.db.reads import (
    DW_MODULUS,
    Chunk,
    batches,
    read_charge_fingerprints,
    read_month_fingerprints,
)
from billing_jobs.rules.calendar import Month, day_from_number

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
    out = [None if v is None or v is pd.NaT else v for v in values.tolist()]
    if is_timestamp:
        out = [v.strftime("%Y-%m-%d %H:%M:%S.%f") if isinstance(v, datetime) else v for v in out]
    return out


def _copy_text(frame: pd.DataFrame) -> str:
    """Rows in PostgreSQL's COPY text format (tab-separated, \\N for NULL)."""
    out = frame.copy()
    for col in out.columns:
        if out[col].dtype.kind not in "iufbM":
            text = out[col]
            needs = text.notna() & text.astype(str).str.contains(r"[\\\t\n\r]", regex=True)
            if needs.any():
                text = text.where(
                    ~needs,
                    text.astype(str)
                    .str.replace("\\", "\\\\", regex=False)
                    .str.replace("\t", "\\t", regex=False)
                    .str.replace("\n", "\\n", regex=False)
                    .str.replace("\r", "\\r", regex=False),
                )
            out[col] = text
    return str(out.to_csv(sep="\t", header=False, index=False, na_rep="\\N", quoting=csv.QUOTE_NONE))


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
        ready = pd.DataFrame(data)
        with raw.cursor() as cur, cur.copy(f'COPY "{table.name}" ({names}) FROM STDIN') as copy:
            for start in range(0, len(ready), COPY_BLOCK):
                copy.write(_copy_text(ready.iloc[start : start + COPY_BLOCK]))
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


def analyze(conn: Connection, *tables: Table) -> None:
    """Refresh the planner's statistics after a large write (PostgreSQL)."""
    if conn.dialect.name == "postgresql":
        for table in tables:
            conn.exec_driver_sql(f'ANALYZE "{table.name}"')


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


def _fingerprints(df: pd.DataFrame) -> pd.DataFrame:
    """Per (project, charge type): count, amount, quantity and a day-weighted sum."""
    return (
        df.assign(_dw=df["dom"] * np.fmod(df["amount_units"].to_numpy(dtype=np.int64), DW_MODULUS))
        .groupby(["project_id", "charge_type", "account_id"], as_index=False)
        .agg(
            n=("amount_units", "size"),
            amount=("amount_units", "sum"),
            quantity=("quantity_units", "sum"),
            dw=("_dw", "sum"),
        )
    )


def sync_daily_charges(
    conn: Connection,
    truth: pd.DataFrame,
    first_day: int,
    last_day: int,
    chunk: Chunk,
    *,
    run_id: str,
    now: datetime,
    existing: pd.DataFrame | None = None,
) -> tuple[int, int]:
    """Make the chunk's charges on days first..last (one month) equal `truth`.

    existing: the chunk's fingerprints if the caller read them already (see
    `reads.read_charge_fingerprints`); read here otherwise.

    truth: project_id, account_id, charge_type, day, quantity_units, amount_units.
    Compares per (project, charge type) fingerprints computed by the database
    with those of the truth; only projects that differ are rewritten, so a re-run
    over unchanged data writes nothing. Returns (rows inserted, rows deleted).
    """
    first, last = day_from_number(first_day), day_from_number(last_day)
    month = Month.of(first)
    whole_month = first == month.first_day and last == month.last_day
    dc = daily_charges.c
    if existing is None:
        existing = (
            read_month_fingerprints(conn, str(month), chunk)
            if whole_month
            else read_charge_fingerprints(conn, first, last, chunk)
        )
    dom_truth = (
        truth["day"].to_numpy(dtype=np.int64).astype("datetime64[D]")
        - truth["day"].to_numpy(dtype=np.int64).astype("datetime64[D]").astype("datetime64[M]")
    ).astype(np.int64) + 1
    wanted = _fingerprints(truth.assign(dom=dom_truth)) if len(truth) else existing.iloc[0:0]
    merged = wanted.merge(existing, on=["project_id", "charge_type"], how="outer", suffixes=("", "_db"))
    differs = np.zeros(len(merged), dtype=bool)
    for col in ("n", "amount", "quantity", "dw"):
        differs |= merged[col].fillna(-1).to_numpy() != merged[f"{col}_db"].fillna(-1).to_numpy()
    changed = set(merged.loc[differs, "project_id"])
    if not changed:
        return 0, 0
    deleted = 0
    stale = sorted(changed & set(existing["project_id"]))
    for ids in batches(stale, 1000):
        deleted += (
            conn.execute(
                delete(daily_charges).where(
                    dc.project_id.in_(ids),
                    dc.charge_date >= first,
                    dc.charge_date <= last,
                )
            ).rowcount
            or 0
        )
    rows = truth.loc[truth["project_id"].isin(changed)]
    inserted = insert_charges(conn, rows, run_id=run_id, now=now)
    add_to_totals(conn, str(month), _deltas(merged.loc[merged["project_id"].isin(changed)]))
    return inserted, deleted


FINGERPRINT = ["n", "amount", "quantity", "dw"]


def _deltas(merged: pd.DataFrame) -> pd.DataFrame:
    """What the rewrite changes in each (project, charge type) fingerprint: truth - before."""
    out = pd.DataFrame(
        {
            "project_id": merged["project_id"].to_numpy(dtype=object),
            "charge_type": merged["charge_type"].to_numpy(dtype=object),
            "account_id": merged["account_id"].fillna(merged["account_id_db"]).to_numpy(dtype=object),
        }
    )
    nonzero = np.zeros(len(out), dtype=bool)
    for col in FINGERPRINT:
        diff = merged[col].fillna(0).to_numpy(dtype=np.int64) - merged[f"{col}_db"].fillna(0).to_numpy(
            dtype=np.int64
        )
        out[col] = diff
        nonzero |= diff != 0
    return out.loc[nonzero]


total_deltas = Table(
    "billing_total_deltas",
    MetaData(),
    Column("project_id", String(64)),
    Column("charge_type", String(32)),
    Column("account_id", String(64)),
    *(Column(c, BigInteger) for c in FINGERPRINT),
    prefixes=["TEMPORARY"],
    postgresql_on_commit="DROP",
)

_ADD_TOTALS = (
    "INSERT INTO charge_totals (project_id, charge_type, period, account_id, n, amount, quantity, dw)"
    " SELECT project_id, charge_type, :period, account_id, n, amount, quantity, dw"
    " FROM billing_total_deltas WHERE true"
    " ON CONFLICT (project_id, charge_type, period) DO UPDATE SET"
    " account_id = excluded.account_id, n = charge_totals.n + excluded.n,"
    " amount = charge_totals.amount + excluded.amount,"
    " quantity = charge_totals.quantity + excluded.quantity, dw = charge_totals.dw + excluded.dw"
)
_DROP_EMPTY_TOTALS = (
    "DELETE FROM charge_totals WHERE period = :period AND n = 0"
    " AND project_id IN (SELECT project_id FROM billing_total_deltas)"
)


def add_to_totals(conn: Connection, period: str, deltas: pd.DataFrame) -> None:
    """Add fingerprint differences to `charge_totals` (in the charges' transaction).

    Sums are additive, so a nightly run that adds one day adds that day alone,
    without re-reading the month's charges; a total that falls to no charges is removed.
    """
    if deltas.empty:
        return
    total_deltas.create(conn)
    try:
        bulk_insert(conn, total_deltas, deltas[["project_id", "charge_type", "account_id", *FINGERPRINT]])
        conn.execute(text(_ADD_TOTALS), {"period": period})
        conn.execute(text(_DROP_EMPTY_TOTALS), {"period": period})
    finally:
        if conn.dialect.name != "postgresql":
            total_deltas.drop(conn)


# Charges travel to the database as runs of consecutive days with the same amount
# and are expanded there: a month of storage fees is one row per project, not 30.
charge_runs = Table(
    "billing_charge_runs",
    MetaData(),
    Column("project_id", String(64)),
    Column("charge_type", String(32)),
    Column("first_day", Date),
    Column("n_days", Integer),
    Column("account_id", String(64)),
    Column("quantity_units", BigInteger),
    Column("amount_units", BigInteger),
    prefixes=["TEMPORARY"],
    postgresql_on_commit="DROP",
)

_EXPAND = {
    "postgresql": (
        "INSERT INTO daily_charges (project_id, charge_type, charge_date, account_id, quantity_units,"
        " amount_units, run_id, recorded_at)"
        " SELECT r.project_id, r.charge_type, r.first_day + g.n, r.account_id, r.quantity_units,"
        " r.amount_units, :run_id, :now"
        " FROM billing_charge_runs r CROSS JOIN LATERAL generate_series(0, r.n_days - 1) AS g(n)"
    ),
    "sqlite": (
        "WITH RECURSIVE g(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM g WHERE n < 30)"
        " INSERT INTO daily_charges (project_id, charge_type, charge_date, account_id, quantity_units,"
        " amount_units, run_id, recorded_at)"
        " SELECT r.project_id, r.charge_type, date(r.first_day, '+' || g.n || ' days'), r.account_id,"
        " r.quantity_units, r.amount_units, :run_id, :now"
        " FROM billing_charge_runs r JOIN g ON g.n < r.n_days"
    ),
}


def to_runs(rows: pd.DataFrame) -> pd.DataFrame:
    """Charges (project_id, account_id, charge_type, day, quantity_units, amount_units)
    as runs of consecutive days with equal quantity and amount: ..., first_day, n_days."""
    pcode, _ = pd.factorize(rows["project_id"])
    tcode, _ = pd.factorize(rows["charge_type"])
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


def insert_charges(conn: Connection, rows: pd.DataFrame, *, run_id: str, now: datetime) -> int:
    """Insert daily charges in bulk: runs go to a temporary table, the database expands them."""
    if rows.empty:
        return 0
    runs = to_runs(rows)
    if int(runs["n_days"].max()) > 31:
        raise ValueError("a run of charges spans more than one month")
    charge_runs.create(conn)
    try:
        bulk_insert(conn, charge_runs, runs, date_columns=["first_day"])
        stamp = now.strftime("%Y-%m-%d %H:%M:%S.%f") if conn.dialect.name == "sqlite" else now
        conn.execute(text(_EXPAND[conn.dialect.name]), {"run_id": run_id, "now": stamp})
    finally:
        if conn.dialect.name != "postgresql":
            charge_runs.drop(conn)
    return int(runs["n_days"].sum())


def record_rejects(conn: Connection, found: pd.DataFrame, *, run_id: str, now: datetime) -> int:
    """Store rejected source rows (source_table, source_id, reason, project_id, period, detail).

    A row already recorded with the same reason is left as it is; returns how many are new.
    """
    if found.empty:
        return 0
    records = (
        found[["source_table", "source_id", "reason", "project_id", "period", "detail"]]
        .drop_duplicates(["source_table", "source_id", "reason"])
        .assign(first_run_id=run_id, first_seen_at=now, status="open")
        .to_dict("records")
    )
    return insert_ignore(conn, rejects, records)
