"""Invoice export: every finalized invoice line of a month (contract.md), or one row
per finalized invoice (its header); as CSV or Parquet (`jobs.warehouse`, docs/exports.md)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TextIO

from sqlalchemy import ColumnElement, Engine, Select, case, select

from billing_jobs.db.billing_tables import invoice_lines, invoices
from billing_jobs.jobs.warehouse import INTEGER, STRING, TIMESTAMP, UNITS, Field, Row, Rows, write_csv
from billing_jobs.rules.invoice import LINE_ORDER

# The contract's columns first and in its order; the columns after them are ours.
LINE_FIELDS = [
    Field("invoice_id", STRING),
    Field("invoice_kind", STRING),
    Field("account_id", STRING),
    Field("project_id", STRING),
    Field("period", STRING),
    Field("line_type", STRING),
    Field("quantity", UNITS),
    Field("unit_price", STRING),  # the price as set: any number of decimals; empty for refunds
    Field("amount", UNITS),
    Field("invoice_sequence", INTEGER),
    Field("invoice_number", STRING),
    Field("finalized_at", TIMESTAMP),  # last: the one column that differs between equal re-runs
]
HEADER = [f.name for f in LINE_FIELDS]

HEADER_FIELDS = [
    Field("invoice_id", STRING),
    Field("invoice_number", STRING),
    Field("invoice_kind", STRING),
    Field("account_id", STRING),
    Field("period", STRING),
    Field("status", STRING),
    Field("total", UNITS),
    Field("line_count", INTEGER),
    Field("invoice_sequence", INTEGER),
    Field("finalized_at", TIMESTAMP),
]


def _code_point(engine: Engine, column: ColumnElement[str]) -> ColumnElement[str]:
    """Ids ordered by code point (PostgreSQL's "C" collation, SQLite's BINARY on UTF-8),
    never by the server's linguistic collation."""
    return column.collate("C") if engine.dialect.name == "postgresql" else column


def _batches(engine: Engine, stmt: Select[tuple[object, ...]], batch: int) -> Iterator[list[Row]]:
    with engine.connect() as conn:
        result = conn.execute(stmt.execution_options(yield_per=batch))
        for rows in result.partitions():
            yield [tuple(r) for r in rows]


def month_lines(engine: Engine, period: str, batch: int = 50_000) -> Rows:
    """The month's finalized lines, ordered by account, invoice (regular first, then
    adjustments in order), project and line type: the same data gives the same bytes."""
    il, inv = invoice_lines.c, invoices.c
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
            case((il.unit_price == "", None), else_=il.unit_price),
            il.amount_units,
            inv.sequence,
            inv.invoice_number,
            inv.finalized_at,
        )
        .join(invoices, inv.invoice_id == il.invoice_id)
        .where(il.period == period, inv.status == "finalized")
        .order_by(
            _code_point(engine, il.account_id),
            inv.sequence,
            _code_point(engine, il.project_id),
            line_rank,
            il.line_type,
        )
    )
    return Rows(LINE_FIELDS, _batches(engine, stmt, batch))


def month_headers(engine: Engine, period: str, batch: int = 50_000) -> Rows:
    """The month's finalized invoices, one row each, in the order of `month_lines`."""
    inv = invoices.c
    stmt = (
        select(
            inv.invoice_id,
            inv.invoice_number,
            inv.kind,
            inv.account_id,
            inv.period,
            inv.status,
            inv.total_units,
            inv.line_count,
            inv.sequence,
            inv.finalized_at,
        )
        .where(inv.period == period, inv.status == "finalized")
        .order_by(_code_point(engine, inv.account_id), inv.sequence)
    )
    return Rows(HEADER_FIELDS, _batches(engine, stmt, batch))


def export_month(engine: Engine, period: str, out: TextIO, batch: int = 50_000) -> int:
    """Write the month's lines to `out` as CSV; returns the number of lines written."""
    return write_csv(month_lines(engine, period, batch), out)
