"""Invoice numbers: gapless per series (regular, adjustment) and calendar year.

A number reads `R-2026-000001` (regular) or `A-2026-000001` (adjustment): the
series letter, the calendar year of the invoice's period, and its place in that
series and year, zero-padded to six digits (wider past 999,999). The year is the
period's, not the finalization's: an adjustment of December 2025 finalized in
January 2026 is `A-2025-...`.
"""

from __future__ import annotations

from collections.abc import Iterable

SERIES_PREFIX = {"regular": "R", "adjustment": "A"}


def series_year(period: str) -> int:
    """The numbering year of a period `YYYY-MM`."""
    return int(period[:4])


def format_number(series: str, year: int, n: int) -> str:
    """`format_number("regular", 2026, 1)` -> `R-2026-000001`."""
    return f"{SERIES_PREFIX[series]}-{year:04d}-{n:06d}"


def numbered(invoice_ids: Iterable[str], series: str, year: int, last: int) -> list[tuple[str, str]]:
    """(invoice_id, number) for invoices finalized together, after number `last` of
    their series and year: in code-point order of their ids, whatever the database's
    collation or the order they were read in."""
    return [
        (invoice, format_number(series, year, last + i))
        for i, invoice in enumerate(sorted(invoice_ids), start=1)
    ]
