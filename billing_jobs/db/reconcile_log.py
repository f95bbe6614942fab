"""The reconcile checks recorded (`month_reconciles`), as `status` and the scheduler
read them; light enough for the commands that only read (no pandas)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, select

from billing_jobs.db.billing_tables import month_closes, month_reconciles

OK, DIFFERS, BUSY = "ok", "differs", "busy"


def latest_reconciles(conn: Connection) -> dict[str, Any]:
    """Each closed month's latest finished check (ok or differs; busy ones are passed
    over): period -> its month_reconciles row."""
    mr = month_reconciles.c
    rows = conn.execute(
        select(month_reconciles)
        .join(month_closes, month_closes.c.period == mr.period)
        .where(mr.status.in_([OK, DIFFERS]))
        .order_by(mr.period, mr.checked_at, mr.run_id)
    )
    return {row.period: row for row in rows}
