"""A month's invoices as the jobs store them: the sums of the finalized lines (what a
re-close and reconcile compare with), the next adjustment's sequence, and the drafts a
month-end chunk writes (`rules.invoice.drafts_for` makes them) and its next run removes.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import numpy as np
from sqlalchemy import Connection, delete, func, select

from billing_jobs.db.billing_tables import invoice_lines, invoices
from billing_jobs.db.reads import read_frame
from billing_jobs.db.sql import Chunk
from billing_jobs.db.writes import bulk_insert
from billing_jobs.frames import pd
from billing_jobs.rules.calendar import Month
from billing_jobs.rules.invoice import KEY


def invoiced_lines(conn: Connection, month: Month, chunk: Chunk) -> pd.DataFrame:
    """Sum of the month's finalized invoice lines per (account, project, line type).

    Drafts (of a run that was interrupted, or held for approval) are not counted.
    The lines are read as stored, without a grouping in the database: the lines of one
    invoice are unique per (project, line type), so only the accounts with more than
    their regular invoice (an adjustment: `sequence` above 0) can hold a key twice,
    and only their lines are summed here.
    """
    il = invoice_lines.c
    stmt = (
        select(
            il.account_id,
            il.project_id,
            il.line_type,
            il.quantity_units,
            il.amount_units,
            invoices.c.sequence,
        )
        .select_from(invoice_lines.join(invoices, invoices.c.invoice_id == il.invoice_id))
        .where(il.period == str(month), chunk.clause(il.account_id), invoices.c.status == "finalized")
    )
    lines = read_frame(conn, stmt, ints=["quantity_units", "amount_units", "sequence"], aggregate=True)
    adjusted = lines["sequence"].to_numpy(dtype=np.int64) != 0
    lines = lines.drop(columns="sequence")
    if not adjusted.any():
        return lines
    twice = lines["account_id"].isin(set(lines.loc[adjusted, "account_id"])).to_numpy(dtype=bool)
    summed = (
        lines.loc[twice].groupby(KEY, as_index=False, sort=False)[["quantity_units", "amount_units"]].sum()
    )
    return pd.concat([lines.loc[~twice], summed[lines.columns]], ignore_index=True)


def next_sequences(conn: Connection, month: Month, chunk: Chunk) -> dict[str, int]:
    """Per account of the chunk with finalized invoices of the month: the sequence its
    next adjustment takes."""
    inv = invoices.c
    rows = conn.execute(
        select(inv.account_id, func.max(inv.sequence))
        .where(inv.period == str(month), chunk.clause(inv.account_id), inv.status == "finalized")
        .group_by(inv.account_id)
    )
    return {account: int(seq) + 1 for account, seq in rows}


def count_drafts(conn: Connection, month: Month, chunk: Chunk) -> int:
    inv = invoices.c
    where = [inv.period == str(month), inv.status == "draft", chunk.clause(inv.account_id)]
    return int(conn.execute(select(func.count()).select_from(invoices).where(*where)).scalar_one())


def delete_drafts(conn: Connection, month: Month, chunk: Chunk | None, keep_runs: Sequence[str] = ()) -> int:
    """Remove the month's draft invoices (of the chunk's accounts), except those of `keep_runs`."""
    inv = invoices.c
    where = [inv.period == str(month), inv.status == "draft"]
    if chunk is not None:
        where.append(chunk.clause(inv.account_id))
    if keep_runs:
        where.append(inv.run_id.not_in(list(keep_runs)))
    drafts = select(inv.invoice_id).where(*where)
    conn.execute(delete(invoice_lines).where(invoice_lines.c.invoice_id.in_(drafts)))
    return conn.execute(delete(invoices).where(*where)).rowcount or 0


def write_drafts(
    conn: Connection, heads: pd.DataFrame, lines: pd.DataFrame, month: Month, *, run_id: str, now: datetime
) -> None:
    """Insert draft invoices and their lines (`rules.invoice.drafts_for`)."""
    if heads.empty:
        return
    bulk_insert(
        conn,
        invoices,
        heads.assign(period=str(month), status="draft", run_id=run_id, created_at=now, finalized_at=None)[
            [
                "invoice_id",
                "account_id",
                "period",
                "kind",
                "sequence",
                "status",
                "total_units",
                "line_count",
                "run_id",
                "created_at",
                "finalized_at",
            ]
        ],
    )
    bulk_insert(
        conn,
        invoice_lines,
        lines.assign(period=str(month))[
            [
                "invoice_id",
                "project_id",
                "line_type",
                "account_id",
                "period",
                "quantity_units",
                "unit_price",
                "amount_units",
            ]
        ],
    )
