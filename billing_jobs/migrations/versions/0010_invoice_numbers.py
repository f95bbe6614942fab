"""Invoice numbers: gapless per series (regular, adjustment) and year of the period

Revision ID: 0010
Revises: 0009

`invoices.invoice_number` (unique; NULL for drafts) and `invoice_series`, the last
number given per series and year. Invoices finalized before this migration are
numbered here, per series and year of their period, in the order they were
finalized (`finalized_at`, then invoice id in code-point order): the numbers they
would have been given at finalization. The counters continue after them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

PREFIX = {"regular": "R", "adjustment": "A"}  # as `rules.numbering` (a migration stays as written)


def upgrade() -> None:
    op.add_column("invoices", sa.Column("invoice_number", sa.String(length=32), nullable=True))
    op.create_index("ix_invoices_invoice_number", "invoices", ["invoice_number"], unique=True)
    series = op.create_table(
        "invoice_series",
        sa.Column("series", sa.String(length=16), nullable=False),
        sa.Column("year", sa.Integer(), nullable=False),
        sa.Column("last_number", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("series", "year", name=op.f("pk_invoice_series")),
    )
    assert series is not None
    invoices = sa.table(
        "invoices",
        sa.column("invoice_id", sa.String),
        sa.column("kind", sa.String),
        sa.column("period", sa.String),
        sa.column("status", sa.String),
        sa.column("finalized_at", sa.DateTime),
        sa.column("invoice_number", sa.String),
    )
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(invoices.c.invoice_id, invoices.c.kind, invoices.c.period, invoices.c.finalized_at).where(
            invoices.c.status == "finalized"
        )
    ).all()
    last: dict[tuple[str, int], int] = {}
    numbers = []
    for invoice_id, kind, period, _finalized_at in sorted(rows, key=lambda r: (r[3], r[0])):
        key = (str(kind), int(str(period)[:4]))
        last[key] = last.get(key, 0) + 1
        numbers.append({"b_id": invoice_id, "b_number": f"{PREFIX[key[0]]}-{key[1]:04d}-{last[key]:06d}"})
    if numbers:
        conn.execute(
            invoices.update()
            .where(invoices.c.invoice_id == sa.bindparam("b_id"))
            .values(invoice_number=sa.bindparam("b_number")),
            numbers,
        )
        op.bulk_insert(
            series,
            [{"series": s, "year": y, "last_number": n} for (s, y), n in sorted(last.items())],
        )


def downgrade() -> None:
    op.drop_table("invoice_series")
    op.drop_index("ix_invoices_invoice_number", table_name="invoices")
    # ALTER TABLE ... DROP COLUMN on SQLite too (3.35+): a batch copy of `invoices` would
    # drop the table, and its ON DELETE CASCADE would take the invoice lines with it.
    op.drop_column("invoices", "invoice_number")
