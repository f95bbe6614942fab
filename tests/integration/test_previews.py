"""Previews of a month that has not ended show the invoices so far, and write nothing."""

from __future__ import annotations

import csv
from datetime import UTC, datetime
from pathlib import Path

import time_machine
from support import SourceData, run_cli


def test_an_open_month_preview_shows_the_invoices_through_yesterday(db_url: str, tmp_path: Path) -> None:
    data = SourceData().project("p1", created="2025-11-02")
    data.compute("p1", "2026-05-02 10:00", "0.1", count=300)  # waiver reached already
    data.project("p2", created="2025-11-02", account="acct-2")
    data.write_url(db_url)
    out = tmp_path / "may-so-far.csv"

    with time_machine.travel(datetime(2026, 5, 11, 3, 0, tzinfo=UTC), tick=False):
        result = run_cli(db_url, "month-end", "--month", "2026-05", "--dry-run", "--output", str(out))

    assert result.code == 0, result.stderr
    assert "through 2026-05-10" in result.stdout
    with out.open(encoding="utf-8") as fh:
        rows = {(r["project_id"], r["line_type"]): (r["quantity"], r["amount"]) for r in csv.DictReader(fh)}
    assert rows == {
        ("p1", "storage_fee"): ("10", "10"),
        ("p1", "storage_refund"): ("1", "-10"),
        ("p2", "storage_fee"): ("10", "10"),
    }


def test_a_month_that_has_not_ended_cannot_be_closed(db_url: str) -> None:
    SourceData().project("p1", created="2025-11-02").write_url(db_url)
    with time_machine.travel(datetime(2026, 5, 31, 23, 0, tzinfo=UTC), tick=False):
        result = run_cli(db_url, "month-end", "--month", "2026-05")
    assert result.code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--dry-run" in result.stderr
