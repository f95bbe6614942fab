"""Invoice export: every finalized invoice line of a month as CSV (contract.md)."""

from __future__ import annotations

import csv
from typing import TextIO

from sqlalchemy import ColumnElement, Engine, case, select

from billing_jobs.db.billing_tables import invoice_lines, invoices
from billing_jobs.rules.invoice import LINE_ORDER
from billing_jobs.rules.money import format_units

HEADER = [
    "invoice_id",
    "invoice_kind",
    "account_id",
    "project_id",
    "period",
    "line_type",
    "quantity",
    "unit_price",
    "amount",
    "invoice_sequence",
    "finalized_at",
]


def export_month(engine: Engine, period: str, out: TextIO, batch: int = 50_000) -> int:
    """Write the month's lines to `out`; returns the number of lines written.

    Rows are ordered by account, invoice (regular first, then adjustments in
    order), project and line type, so the same data always gives the same bytes.
    Ids are ordered by code point (PostgreSQL's "C" collation, SQLite's BINARY on
    UTF-8), never by the server's linguistic collation.
    """
    il, inv = invoice_lines.c, invoices.c
    postgres = engine.dialect.name == "postgresql"

    def code_point(column: ColumnElement[str]) -> ColumnElement[str]:
        return column.collate("C") if postgres else column

    line_rank = case({t: i for i, t in enumerate(LINE_ORDER)}, value=il.line_type, else_=99)
    stmt = (
        select(
            il.invoice_id,
            inv.kind,
            il.account_id,
            il.project_id,
            il.period,
            il.line_type,
            il.quantity_units,
            il.unit_price,
            il.amount_units,
            inv.sequence,
            inv.finalized_at,
        )
        .join(invoices, inv.invoice_id == il.invoice_id)
        .where(il.period == period, inv.status == "finalized")
        .order_by(code_point(il.account_id), inv.sequence, code_point(il.project_id), line_rank, il.line_type)
    )
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(HEADER)
    written = 0
    with engine.connect() as conn:
        result = conn.execute(stmt.execution_options(yield_per=batch))
        for rows in result.partitions():
            writer.writerows(
                (
                    r.invoice_id,
                    r.kind,
                    r.account_id,
                    r.project_id,
                    r.period,
                    r.line_type,
                    format_units(r.quantity_units),
                    r.unit_price,
                    format_units(r.amount_units),
                    r.sequence,
                    r.finalized_at.strftime("%Y-%m-%dT%H:%M:%SZ") if r.finalized_at else "",
                )
                for r in rows
            )
            written += len(rows)
    return written
