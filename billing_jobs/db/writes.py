"""Writes to the jobs' own tables: in bulk, idempotent, inside the caller's transaction."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import Connection, Table, delete, extract, func, select
from sqlalchemy.dialects import postgresql, sqlite

from billing_jobs.db.billing_tables import daily_charges, rejects
from billing_jobs.db.reads import Chunk
from billing_jobs.rules.calendar import day_from_number

SQL_BATCH = 5_000


def _records(df: pd.DataFrame, date_columns: Sequence[str] = ()) -> list[dict[str, Any]]:
    out = df.copy()
    for col in date_columns:
        out[col] = [day_from_number(n) for n in out[col].to_numpy(dtype=np.int64)]
    for col in out.columns:
        if out[col].dtype.kind == "i":
            out[col] = out[col].astype(object)
    return out.to_dict("records")


def bulk_insert(conn: Connection, table: Table, rows: pd.DataFrame | list[dict[str, Any]]) -> int:
    """Insert many rows: COPY on PostgreSQL, batched executemany elsewhere."""
    records = _records(rows) if isinstance(rows, pd.DataFrame) else rows
    if not records:
        return 0
    if conn.dialect.name == "postgresql":
        columns = list(records[0])
        raw = conn.connection.driver_connection
        cols = ", ".join(f'"{c}"' for c in columns)
        with raw.cursor() as cur, cur.copy(f'COPY "{table.name}" ({cols}) FROM STDIN') as copy:
            for rec in records:
                copy.write_row([rec[c] for c in columns])
        return len(records)
    for start in range(0, len(records), SQL_BATCH):
        conn.execute(table.insert(), records[start : start + SQL_BATCH])
    return len(records)


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
    records = _records(
        rows.rename(columns={"day": "charge_date"})[
            ["project_id", "charge_type", "charge_date", "account_id", "quantity_units", "amount_units"]
        ].assign(run_id=run_id, recorded_at=now),
        date_columns=["charge_date"],
    )
    inserted = bulk_insert(conn, daily_charges, records)
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
