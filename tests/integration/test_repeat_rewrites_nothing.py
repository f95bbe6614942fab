"""A repeated month-end changes no stored row of the jobs' tables, not even by
rewriting it with the same values: every row keeps its physical identity (its
`rowid` on SQLite, its `xmin` and `ctid` on PostgreSQL, which a delete and insert
or an update would change). Equal contents are what the other tests check; this
one checks that a repeat writes nothing at all, on both back ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from support import SourceData
from test_ledger_periods import _config, _month_end, _platform

LEDGER_AND_CHARGES = (
    "charge_periods",
    "invoices",
    "invoice_lines",
    "credit_entries",
    "credit_inputs",
    "credit_lots",
    "credit_lot_states",
    "credit_balances",
    "credit_refunds",
)


def _physical(engine: sa.Engine) -> dict[str, set[tuple[Any, ...]]]:
    """Each table's rows with their physical identity."""
    ident = "rowid" if engine.dialect.name == "sqlite" else "xmin::text, ctid::text"
    with engine.connect() as conn:
        return {
            table: {tuple(r) for r in conn.execute(sa.text(f"SELECT {ident}, * FROM {table}"))}
            for table in LEDGER_AND_CHARGES
        }


def test_a_repeated_month_end_rewrites_no_row(db_url: str, db_engine: sa.Engine, tmp_path: Path) -> None:
    env = _config(tmp_path, 2)
    _platform(db_url)
    # A top-up in June: its lot is June's close's, which a re-close of May must leave be.
    june = SourceData().top_up("A6", "2026-06-05 09:00", "online", account="a", credits="500", amount="50.00")
    june.accounts = []  # account "a" exists
    june.write_url(db_url)
    for month in ("2026-04", "2026-05", "2026-06"):
        _month_end(db_url, env, "--month", month)
    before = _physical(db_engine)
    assert all(before[t] for t in ("charge_periods", "credit_entries", "credit_inputs", "credit_lot_states"))
    assert any("A6" in row for row in before["credit_lots"])
    for month in ("2026-06", "2026-05"):
        _month_end(db_url, env, "--month", month)
        after = _physical(db_engine)
        changed = {t: (len(before[t] - after[t]), len(after[t] - before[t])) for t in LEDGER_AND_CHARGES}
        assert {t: c for t, c in changed.items() if c != (0, 0)} == {}, f"re-close of {month}"
