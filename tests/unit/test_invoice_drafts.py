"""`rules.invoice.drafts_for`: a month-end chunk's lines made into draft invoices, one
per account, named and numbered as the contract's exports show them."""

from __future__ import annotations

import pandas as pd

from billing_jobs.rules.calendar import Month
from billing_jobs.rules.invoice import ADJUSTMENT, HEAD_COLUMNS, REGULAR, drafts_for

MAY = Month.parse("2026-05")


def _lines(*rows: tuple[str, str, str, int]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "account_id": [r[0] for r in rows],
            "project_id": [r[1] for r in rows],
            "line_type": [r[2] for r in rows],
            "quantity_units": [10_000] * len(rows),
            "unit_price": ["1"] * len(rows),
            "amount_units": [r[3] for r in rows],
        }
    )


def test_a_first_close_drafts_one_regular_invoice_per_account_with_its_total_and_line_count():
    lines = _lines(
        ("acct-b", "p1", "storage_fee", 290_000),
        ("acct-a", "p2", "storage_fee", 10_000),
        ("acct-b", "p3", "storage_refund", -290_000),
        ("acct-b", "p3", "storage_fee", 290_000),
    )
    heads, out = drafts_for(lines, MAY, REGULAR, {})
    got = heads.set_index("account_id")
    assert list(got.index) == ["acct-a", "acct-b"]
    assert got.loc["acct-a", "invoice_id"] == "INV-2026-05-acct-a"
    assert got.loc["acct-b", "invoice_id"] == "INV-2026-05-acct-b"
    assert got.loc["acct-b", "total_units"] == 290_000
    assert got.loc["acct-b", "line_count"] == 3
    assert set(got["sequence"]) == {0}
    assert set(got["kind"]) == {REGULAR}
    by_account = dict(zip(out["account_id"], out["invoice_id"], strict=True))
    assert by_account == {"acct-a": "INV-2026-05-acct-a", "acct-b": "INV-2026-05-acct-b"}
    assert len(out) == len(lines)


def test_an_adjustment_takes_the_accounts_next_sequence_and_at_least_one():
    lines = _lines(("acct-a", "p1", "storage_fee", -10_000), ("acct-c", "p9", "storage_fee", 10_000))
    heads, _ = drafts_for(lines, MAY, ADJUSTMENT, {"acct-a": 3})
    got = heads.set_index("account_id")
    assert got.loc["acct-a", "invoice_id"] == "ADJ-2026-05-acct-a-003"
    assert got.loc["acct-c", "invoice_id"] == "ADJ-2026-05-acct-c-001"  # none finalized to follow
    assert got.loc["acct-a", "total_units"] == -10_000


def test_no_lines_no_drafts():
    heads, out = drafts_for(_lines(), MAY, REGULAR, {})
    assert heads.empty
    assert list(heads.columns) == HEAD_COLUMNS
    assert out.empty
    assert "invoice_id" in out.columns
