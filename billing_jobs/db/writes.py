"""Writes to the jobs' own tables: in bulk, idempotent, inside the caller's transaction."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import Connection, DateTime, Table, delete, extract, func, select
from sqlalchemy.dialects import postgresql, sqlite

from billing_jobs.db.billing_tables import daily_charges, rejects
from billing_jobs.db.reads import Chunk
from billing_jobs.rules.calendar import day_from_number

SQL_BATCH = 5_000


def _records(df: pd.DataFrame, date_columns: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Rows as dicts of plain Python values (for small statements)."""
    out = df.copy()
    for col in date_columns:
        out[col] = [day_from_number(n) for n in out[col].to_numpy(dtype=np.int64)]
    for col in out.columns:
        if out[col].dtype.kind == "i":
            out[col] = out[col].astype(object)
    return out.to_dict("records")


def _column_values(values: pd.Series, is_date: bool) -> list[Any]:
    """One column as plain Python values; day numbers become ISO dates, instants ISO text."""
    if is_date:
        days = values.to_numpy(dtype=np.int64).astype("datetime64[D]")
        return np.datetime_as_string(days, unit="D").tolist()
    if values.dtype.kind == "M":
        return [None if pd.isna(v) else v.strftime("%Y-%m-%d %H:%M:%S.%f") for v in values]
    return [None if v is None or v is pd.NaT else v for v in values.tolist()]


def bulk_insert(conn: Connection, table: Table, rows: pd.DataFrame, date_columns: Sequence[str] = ()) -> int:
    """Insert a DataFrame whose columns are columns of `table`.

    PostgreSQL: one COPY stream. SQLite: the driver's executemany over tuples.
    `date_columns` hold day numbers (see rules.calendar).
    """
    if rows.empty:
        return 0
    columns = list(rows.columns)
    data = [_column_values(rows[c], c in date_columns) for c in columns]
    for i, c in enumerate(columns):
        if isinstance(table.c[c].type, DateTime) and c not in date_columns:
            data[i] = [v.strftime("%Y-%m-%d %H:%M:%S.%f") if isinstance(v, datetime) else v for v in data[i]]
    raw = conn.connection.driver_connection
    names = ", ".join(f'"{c}"' for c in columns)
    if conn.dialect.name == "postgresql":
        with raw.cursor() as cur, cur.copy(f'COPY "{table.name}" ({names}) FROM STDIN') as copy:
            for row in zip(*data, strict=True):
                copy.write_row(row)
        return len(rows)
    marks = ", ".join("?" for _ in columns)
    cur = raw.cursor()
    try:
        cur.executemany(f'INSERT INTO "{table.name}" ({names}) VALUES ({marks})', zip(*data, strict=True))
    finally:
        cur.close()
    return len(rows)


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


def _batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _fingerprints(df: pd.DataFrame) -> pd.DataFrame:
    """Per (project, charge type): count, amount, quantity and a day-weighted sum."""
    return (
        df.assign(_dw=df["dom"] * df["amount_units"])
        .groupby(["project_id", "charge_type"], as_index=False)
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
) -> tuple[int, int]:
    """Make the chunk's charges on days first..last (one month) equal `truth`.

    truth: project_id, account_id, charge_type, day, quantity_units, amount_units.
    Compares per (project, charge type) fingerprints computed by the database
    with those of the truth; only projects that differ are rewritten, so a re-run
    over unchanged data writes nothing. Returns (rows inserted, rows deleted).
    """
    first, last = day_from_number(first_day), day_from_number(last_day)
    dc = daily_charges.c
    dom = extract("day", dc.charge_date)
    stmt = (
        select(
            dc.project_id,
            dc.charge_type,
            func.count().label("n"),
            func.sum(dc.amount_units).label("amount"),
            func.sum(dc.quantity_units).label("quantity"),
            func.sum(dom * dc.amount_units).label("dw"),
        )
        .where(
            chunk.clause(dc.account_id),
            dc.charge_date >= first,
            dc.charge_date <= last,
        )
        .group_by(dc.project_id, dc.charge_type)
    )
    existing = pd.DataFrame(
        conn.execute(stmt).all(), columns=["project_id", "charge_type", "n", "amount", "quantity", "dw"]
    )
    for col in ("n", "amount", "quantity", "dw"):
        existing[col] = existing[col].astype(np.int64)
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
    for ids in _batches(stale, 1000):
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
    frame = rows.rename(columns={"day": "charge_date"})[
        ["project_id", "charge_type", "charge_date", "account_id", "quantity_units", "amount_units"]
    ].assign(run_id=run_id, recorded_at=now)
    inserted = bulk_insert(conn, daily_charges, frame, date_columns=["charge_date"])
    return inserted, deleted


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
