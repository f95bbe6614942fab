"""Invoice numbers, through the command line on both back ends.

Finalized invoices are numbered R-YYYY-NNNNNN (regular) and A-YYYY-NNNNNN
(adjustment) per series and year of their period, without gaps: a month-end that
fails inside its finalizing transaction gives its numbers back, and the re-run
gives the same ones. Re-closes continue the adjustment series, the next month
continues the year's series, a new year starts again at 1; held drafts get their
numbers when approved. Invoices finalized before the numbers existed are numbered
by the migration.
"""

from __future__ import annotations

import csv
import io
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
import time_machine
from support import SourceData, ok, run_cli, ts

from billing_jobs.db.billing_tables import invoice_series, invoices
from billing_jobs.db.engine import make_engine, upgrade
from billing_jobs.jobs import month_end
from billing_jobs.jobs.numbering import take_numbers

NOW = datetime(2027, 2, 15, 12, 0, tzinfo=UTC)
LEGACY = "2025-11-02"
# Code-point order A-1 < a-10 < a-9; a linguistic collation would sort them otherwise.
ACCOUNTS = ["a-9", "a-10", "A-1"]


@pytest.fixture(autouse=True)
def frozen_clock() -> Iterator[None]:
    with time_machine.travel(NOW, tick=False):
        yield


class FinalizeFault(RuntimeError):
    pass


def failing_inside_finalize(db_url: str, monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    """Run `args` with its finalizing transaction failing after its work (numbers taken)."""
    real = month_end._finalize
    seen: list[int] = []

    def finalize_then_fail(conn: sa.Connection, **kwargs: Any) -> None:
        real(conn, **kwargs)
        numbered = conn.execute(sa.select(sa.func.count()).where(invoices.c.invoice_number.is_not(None)))
        seen.append(int(numbered.scalar_one()))
        raise FinalizeFault("killed inside the finalize step")

    with monkeypatch.context() as patch:
        patch.setattr(month_end, "_finalize", finalize_then_fail)
        result = run_cli(db_url, *args)
    assert result.code == 1, result.stderr
    assert "FinalizeFault" in result.stderr
    assert len(seen) == 1
    assert seen[0] > 0, "the failed transaction had numbered its invoices"


def numbers(db_url: str) -> dict[str, str | None]:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(invoices.c.invoice_id, invoices.c.invoice_number)).all()
    finally:
        engine.dispose()
    return {str(i): n for i, n in rows}


def counters(db_url: str) -> dict[tuple[str, int], int]:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return {(s, int(y)): int(n) for s, y, n in conn.execute(sa.select(invoice_series))}
    finally:
        engine.dispose()


def assert_gapless(db_url: str) -> None:
    """Every finalized invoice has a number; each series and year runs 1..N, N its counter."""
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(invoices.c.kind, invoices.c.period, invoices.c.status, invoices.c.invoice_number)
            ).all()
    finally:
        engine.dispose()
    given: dict[tuple[str, int], list[int]] = {}
    for kind, period, status, number in rows:
        if status != "finalized":
            assert number is None
            continue
        prefix, year, n = number.split("-")
        assert prefix == {"regular": "R", "adjustment": "A"}[kind]
        assert year == period[:4]
        given.setdefault((kind, int(year)), []).append(int(n))
    expected = {k: list(range(1, n + 1)) for k, n in counters(db_url).items()}
    assert {k: sorted(v) for k, v in given.items()} == expected


def export(db_url: str, month: str, *extra: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(ok(db_url, "export", "--month", month, *extra))))


def test_numbers_have_no_gap_across_failures_re_closes_months_years_and_approval(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = SourceData()
    for account in ACCOUNTS:
        data.project(f"p-{account}", created=LEGACY, account=account)
    data.write_url(db_url)

    # A first close that fails inside its finalizing transaction, then its re-run.
    failing_inside_finalize(db_url, monkeypatch, "month-end", "--month", "2026-11")
    assert counters(db_url) == {}
    assert all(n is None for n in numbers(db_url).values())
    ok(db_url, "month-end", "--month", "2026-11")
    assert numbers(db_url) == {
        "INV-2026-11-A-1": "R-2026-000001",
        "INV-2026-11-a-10": "R-2026-000002",
        "INV-2026-11-a-9": "R-2026-000003",
    }

    # Late data: a re-close's adjustments, failing once, continue their own series.
    late = SourceData()
    late.event("p-a-10", "2026-11-20 00:00", "archived").event("p-A-1", "2026-11-20 00:00", "archived")
    late.write_url(db_url)
    failing_inside_finalize(db_url, monkeypatch, "month-end", "--month", "2026-11")
    assert counters(db_url) == {("regular", 2026): 3}
    ok(db_url, "month-end", "--month", "2026-11")
    got = numbers(db_url)
    assert got["ADJ-2026-11-A-1-001"] == "A-2026-000001"
    assert got["ADJ-2026-11-a-10-001"] == "A-2026-000002"

    # The next month continues the year's regular series (only a-9 is left active).
    ok(db_url, "month-end", "--month", "2026-12")
    assert numbers(db_url)["INV-2026-12-a-9"] == "R-2026-000004"

    # A new year starts again at 1; held drafts have no number until they are approved.
    ok(db_url, "month-end", "--month", "2027-01", "--hold")
    assert numbers(db_url)["INV-2027-01-a-9"] is None
    ok(db_url, "month-end", "--approve", "2027-01")
    assert numbers(db_url)["INV-2027-01-a-9"] == "R-2027-000001"

    # A re-close of December in 2027 is numbered in the year of its period.
    late = SourceData().project("p-a-9-late", created=LEGACY, account="a-9")
    late.accounts = []  # the account is there already
    late.write_url(db_url)
    ok(db_url, "month-end", "--month", "2026-12")
    assert numbers(db_url)["ADJ-2026-12-a-9-001"] == "A-2026-000003"

    assert counters(db_url) == {
        ("regular", 2026): 4,
        ("adjustment", 2026): 3,
        ("regular", 2027): 1,
    }
    assert_gapless(db_url)

    # The export shows each line's invoice number after the contract's columns.
    rows = export(db_url, "2026-11")
    contract = "invoice_id,invoice_kind,account_id,project_id,period,line_type,quantity,unit_price,amount"
    assert list(rows[0])[:9] == contract.split(",")
    assert list(rows[0])[9:] == ["invoice_sequence", "invoice_number", "finalized_at"]
    got = numbers(db_url)
    assert {(r["invoice_id"], r["invoice_number"]) for r in rows} == {
        (i, n) for i, n in got.items() if i.startswith(("INV-2026-11", "ADJ-2026-11"))
    }
    heads = export(db_url, "2026-11", "--headers")
    assert [(h["invoice_id"], h["invoice_number"]) for h in heads] == [
        ("INV-2026-11-A-1", "R-2026-000001"),
        ("ADJ-2026-11-A-1-001", "A-2026-000001"),
        ("INV-2026-11-a-10", "R-2026-000002"),
        ("ADJ-2026-11-a-10-001", "A-2026-000002"),
        ("INV-2026-11-a-9", "R-2026-000003"),
    ]


def test_two_finalizations_at_once_never_take_the_same_numbers(db_url: str) -> None:
    """The counter's UPDATE ... RETURNING waits for an open finalization to end."""
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        taken: list[int] = []
        second_started = threading.Event()

        def second() -> None:
            with engine.begin() as conn:
                second_started.set()
                taken.append(take_numbers(conn, "regular", 2026, 2))

        with engine.begin() as first:
            taken.append(take_numbers(first, "regular", 2026, 3))
            other = threading.Thread(target=second)
            other.start()
            second_started.wait(10)
            other.join(0.5)
            assert other.is_alive(), "the second finalization waits for the first to commit"
        other.join(30)
        assert not other.is_alive()
        # The first reserved 1..3, the second 4..5: no number twice, no gap.
        assert taken == [0, 3]
        with engine.connect() as conn:
            assert conn.execute(sa.select(invoice_series.c.last_number)).scalar_one() == 5
    finally:
        engine.dispose()


def test_the_migration_numbers_invoices_finalized_before_it_in_finalization_order(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine, "0007")
        legacy = sa.table("invoices", *(sa.column(c.name) for c in invoices.c if c.name != "invoice_number"))
        rows = [
            # invoice_id, kind, period, status, finalized_at
            ("INV-2026-05-b", "regular", "2026-05", "finalized", "2026-06-01 02:00"),
            ("INV-2026-05-a", "regular", "2026-05", "finalized", "2026-06-01 02:00"),
            ("ADJ-2026-05-b-001", "adjustment", "2026-05", "finalized", "2026-06-09 02:00"),
            ("INV-2026-06-a", "regular", "2026-06", "finalized", "2026-07-01 02:00"),
            ("ADJ-2026-05-a-001", "adjustment", "2026-05", "finalized", "2026-07-03 02:00"),
            ("INV-2027-01-a", "regular", "2027-01", "finalized", "2027-02-01 02:00"),
            ("INV-2027-02-a", "regular", "2027-02", "draft", None),
        ]
        with engine.begin() as conn:
            for seq, (invoice_id, kind, period, status, at) in enumerate(rows):
                conn.execute(
                    sa.insert(legacy).values(
                        invoice_id=invoice_id,
                        account_id=invoice_id.split("-")[3],
                        period=period,
                        kind=kind,
                        sequence=seq,
                        status=status,
                        total_units=0,
                        line_count=0,
                        run_id="old-run",
                        created_at=ts("2026-06-01"),
                        finalized_at=ts(at) if at else None,
                    )
                )
        upgrade(engine)
    finally:
        engine.dispose()
    assert numbers(db_url) == {
        "INV-2026-05-a": "R-2026-000001",
        "INV-2026-05-b": "R-2026-000002",
        "ADJ-2026-05-b-001": "A-2026-000001",
        "INV-2026-06-a": "R-2026-000003",
        "ADJ-2026-05-a-001": "A-2026-000002",
        "INV-2027-01-a": "R-2027-000001",
        "INV-2027-02-a": None,
    }
    assert counters(db_url) == {("regular", 2026): 3, ("adjustment", 2026): 2, ("regular", 2027): 1}
    assert_gapless(db_url)
