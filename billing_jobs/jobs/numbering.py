"""Invoice numbers given at finalization, in the transaction that finalizes.

The counter of a series and year (`invoice_series`) is moved forward by one
`UPDATE ... RETURNING` for all the invoices finalized together: the row lock it
takes makes a second finalization wait for the first to commit or roll back, and
a rollback (a failed or killed run) returns the numbers with the invoices, so the
next run gives the same numbers again: no gap, no number given twice.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, bindparam, select, update

from billing_jobs.db.billing_tables import invoice_series, invoices
from billing_jobs.db.writes import insert_ignore
from billing_jobs.rules.numbering import numbered, series_year


class NumberingError(RuntimeError):
    """The invoices numbered are not the invoices finalized (the transaction rolls back)."""


def take_numbers(conn: Connection, series: str, year: int, count: int) -> int:
    """Reserve `count` numbers of a series and year; returns the last number before them."""
    insert_ignore(conn, invoice_series, [{"series": series, "year": year, "last_number": 0}])
    s = invoice_series.c
    top = conn.execute(
        update(invoice_series)
        .where(s.series == series, s.year == year)
        .values(last_number=s.last_number + count)
        .returning(s.last_number)
    ).scalar_one()
    return int(top) - count


def number_drafts(conn: Connection, period: str, *where: Any) -> int:
    """Give the drafts of `period` selected by `where` their numbers (before they are
    finalized, in the same transaction); returns how many were numbered."""
    inv = invoices.c
    rows = conn.execute(select(inv.invoice_id, inv.kind).where(inv.period == period, *where)).all()
    by_series: dict[str, list[str]] = {}
    for invoice_id, kind in rows:
        by_series.setdefault(str(kind), []).append(str(invoice_id))
    year = series_year(period)
    set_number = (
        update(invoices)
        .where(inv.invoice_id == bindparam("b_invoice_id"), inv.status == "draft")
        .values(invoice_number=bindparam("b_number"))
    )
    for series in sorted(by_series):
        ids = by_series[series]
        last = take_numbers(conn, series, year, len(ids))
        pairs = numbered(ids, series, year, last)
        conn.execute(set_number, [{"b_invoice_id": i, "b_number": n} for i, n in pairs])
    return len(rows)


def check_numbered(numbered_count: int, finalized_count: int) -> None:
    if numbered_count != finalized_count:
        raise NumberingError(
            f"{finalized_count} invoice(s) finalized but {numbered_count} numbered: nothing was finalized"
        )
