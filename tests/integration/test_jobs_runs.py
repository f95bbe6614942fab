"""Nightly and month-end runs over time: repeats, catch-up, dry runs, late data, corrections.

Every test runs on SQLite and PostgreSQL (`db_url`), through the command line,
under a frozen clock (the CLI asks the clock once, in `commands.common.utcnow`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import time_machine
from sqlalchemy import create_engine, inspect, select, text
from support import CliResult, SourceData, charge_days, export_rows, export_text, run_cli

from billing_jobs.db.billing_tables import billed_days, invoice_lines
from billing_jobs.rules.money import format_units

LEGACY = "2025-11-02"
JUNE_1 = datetime(2026, 6, 1, 3, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def frozen_clock() -> Iterator[None]:
    with time_machine.travel(JUNE_1, tick=False):
        yield


def at(instant: datetime) -> time_machine.travel:
    return time_machine.travel(instant, tick=False)


def ok(db_url: str, *args: str) -> CliResult:
    result = run_cli(db_url, *args)
    assert result.code == 0, result.stderr
    return result


def summary(result: CliResult) -> dict[str, object]:
    events = [json.loads(line) for line in result.stderr.splitlines()]
    found = [e for e in events if e["event"] == "run.summary"]
    assert len(found) == 1, result.stderr
    return found[0]


def all_tables(db_url: str, *, skip: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Every row of every table in the database (source and billing), as sorted text."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            names = sorted(set(inspect(conn).get_table_names()) - set(skip))
            return {
                name: sorted(repr(tuple(r)) for r in conn.execute(text(f'SELECT * FROM "{name}"')))
                for name in names
            }
    finally:
        engine.dispose()


def charges(db_url: str, first: date, last: date) -> dict[tuple[str, str], tuple[int, Decimal]]:
    """(project, charge type) -> (days, amount) of the charges of days first..last (the
    days billed: not the storage fee stored ahead of them)."""
    out: dict[tuple[str, str], tuple[int, Decimal]] = {}
    for p, t, d, _, _, m in charge_days(db_url, billed_only=True):
        if first.isoformat() <= d <= last.isoformat():
            n, total = out.get((p, t), (0, Decimal(0)))
            out[(p, t)] = (n + 1, total + Decimal(format_units(m)))
    return out


def billed(db_url: str) -> list[date]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(billed_days.c.billing_day).order_by(billed_days.c.billing_day)).all()
    finally:
        engine.dispose()
    return [d if isinstance(d, date) else date.fromisoformat(str(d)) for (d,) in rows]


def line_amounts(db_url: str, month: str, kind: str = "regular") -> dict[tuple[str, str], Decimal]:
    return {
        (r["project_id"], r["line_type"]): Decimal(r["amount"])
        for r in export_rows(db_url, month)
        if r["invoice_kind"] == kind
    }


def may_data() -> SourceData:
    """A mix of May activity: legacy, new, archived, published with cloud usage."""
    data = SourceData()
    data.project("legacy", created=LEGACY)
    data.project("new", created="2026-04-20 08:00", account="acct-2")
    data.project("archived", created=LEGACY).event("archived", "2026-05-12 13:00", "archived")
    data.project("site", created=LEGACY, account="acct-2").event("site", "2026-05-03 10:00", "published")
    data.cloud("site", "2026-05-03", "page_views", "12345").cloud(
        "site", "2026-05-04", "bandwidth_gb", "1.2345"
    )
    data.cloud("site", "2026-05-20", "domains", "2").cloud("site", "2026-05-20", "domains", "1")
    data.cloud("site", "2026-05-31", "data_storage_gb", "10.5")
    return data


def test_repeating_nightly_for_the_same_date_changes_nothing(db_url: str):
    may_data().write_url(db_url)
    first = ok(db_url, "nightly", "--date", "2026-05-20")
    assert summary(first)["storage_charges"] == 3
    before = all_tables(db_url, skip=("billing_runs",))
    assert before["charge_periods"]
    again = ok(db_url, "nightly", "--date", "2026-05-20")
    assert all_tables(db_url, skip=("billing_runs",)) == before
    assert summary(again).get("rows_inserted", 0) == 0
    assert summary(again).get("rows_deleted", 0) == 0


def test_nightly_catch_up_bills_every_day_from_the_effective_date_to_yesterday(db_url: str, tmp_path: Path):
    SourceData().project("p1", created=LEGACY).write_url(db_url)
    config = tmp_path / "billing.toml"
    config.write_text("[promotions]\nlegacy_free_months = 0\n")
    with at(datetime(2026, 4, 3, 5, 0, tzinfo=UTC)):
        result = ok(db_url, "--config", str(config), "nightly")
    expected = [date(2026, 3, 24) + timedelta(days=i) for i in range(10)]  # 03-24 .. 04-02
    assert billed(db_url) == expected
    assert charges(db_url, date(2026, 3, 1), date(2026, 4, 30)) == {("p1", "storage_fee"): (10, Decimal(10))}
    assert summary(result)["days_billed"] == 10

    before = all_tables(db_url, skip=("billing_runs",))
    with at(datetime(2026, 4, 3, 23, 0, tzinfo=UTC)):
        again = ok(db_url, "--config", str(config), "nightly")
    assert "nothing to bill" in again.stdout
    assert all_tables(db_url, skip=("billing_runs",)) == before

    with at(datetime(2026, 4, 4, 0, 30, tzinfo=UTC)):
        ok(db_url, "--config", str(config), "nightly")
    assert billed(db_url) == [*expected, date(2026, 4, 3)]
    assert charges(db_url, date(2026, 3, 1), date(2026, 4, 30)) == {("p1", "storage_fee"): (11, Decimal(11))}


def test_nightly_charges_of_a_month_sum_to_its_month_end_invoice(db_url: str):
    may_data().write_url(db_url)
    with at(datetime(2026, 5, 16, 2, 0, tzinfo=UTC)):
        ok(db_url, "nightly")  # catch-up to 05-15
    ok(db_url, "nightly")  # the rest of May
    assert billed(db_url)[-1] == date(2026, 5, 31)
    nightly = charges(db_url, date(2026, 5, 1), date(2026, 5, 31))
    assert nightly[("legacy", "storage_fee")] == (29, Decimal(29))
    assert nightly[("archived", "storage_fee")] == (12, Decimal(12))

    result = ok(db_url, "month-end", "--month", "2026-05")
    assert summary(result).get("rows_inserted", 0) == 0
    assert charges(db_url, date(2026, 5, 1), date(2026, 5, 31)) == nightly
    invoiced = line_amounts(db_url, "2026-05")
    assert invoiced == {key: amount for key, (_, amount) in nightly.items()}
    assert invoiced[("site", "cloud_bandwidth")] == Decimal("0.6173")
    assert invoiced[("site", "cloud_domains")] == Decimal("0.3")


def test_a_dry_run_writes_nothing_at_all_and_prints_a_preview(db_url: str):
    may_data().write_url(db_url)
    ok(db_url, "month-end", "--month", "2026-04")
    SourceData().compute("legacy", "2026-04-30 12:00", "40").write_url(db_url)  # April would change
    before = all_tables(db_url)
    assert before["billing_runs"]

    out = {}
    for args in (
        ("nightly", "--dry-run"),
        ("nightly", "--date", "2026-05-20", "--dry-run"),
        ("month-end", "--month", "2026-05", "--dry-run"),
        ("month-end", "--month", "2026-04", "--dry-run"),
        ("month-end", "--month", "2026-06", "--dry-run"),  # not ended: preview only
    ):
        out[args] = ok(db_url, *args).stdout
        assert "dry run: nothing was written" in out[args], args
        assert all_tables(db_url) == before, args

    assert "would charge" in out["nightly", "--dry-run"]
    assert "would charge" in out["nightly", "--date", "2026-05-20", "--dry-run"]
    preview = out["month-end", "--month", "2026-05", "--dry-run"]
    assert "INV-2026-05-acct-1" in preview
    assert "storage_fee" in preview
    adjustment = out["month-end", "--month", "2026-04", "--dry-run"]
    assert "ADJ-2026-04-acct-1" in adjustment
    assert "storage_refund" in adjustment


def test_a_dry_run_on_a_new_database_creates_no_tables(db_url: str):
    may_data().write_url(db_url)
    before = all_tables(db_url)
    assert "billing_runs" not in before
    ok(db_url, "nightly", "--dry-run")
    ok(db_url, "month-end", "--month", "2026-05", "--dry-run")
    assert all_tables(db_url) == before


def test_a_dry_run_preview_can_be_written_as_csv(db_url: str, tmp_path: Path):
    may_data().write_url(db_url)
    out = tmp_path / "preview.csv"
    ok(db_url, "month-end", "--month", "2026-05", "--dry-run", "--output", str(out))
    ok(db_url, "month-end", "--month", "2026-05")
    preview = out.read_text().splitlines()
    exported = export_text(db_url, "2026-05").splitlines()
    columns = 9  # the contract's columns; the export adds more after them
    assert preview == [",".join(line.split(",")[:columns]) for line in exported]


def test_late_data_after_close_writes_an_adjustment_and_leaves_the_regular_invoice(db_url: str):
    may_data().write_url(db_url)
    ok(db_url, "month-end", "--month", "2026-05")
    regular = [line for line in export_text(db_url, "2026-05").splitlines() if ",regular," in line]

    late = SourceData()
    late.cloud("site", "2026-05-25", "page_views", "1000")  # late usage
    late.event("legacy", "2026-05-21 00:00", "archived")  # back-dated archive
    late.write_url(db_url)
    with at(JUNE_1 + timedelta(days=3)):
        ok(db_url, "month-end", "--month", "2026-05")

    assert [line for line in export_text(db_url, "2026-05").splitlines() if ",regular," in line] == regular
    adjustments = line_amounts(db_url, "2026-05", "adjustment")
    assert adjustments == {("site", "cloud_page_views"): Decimal("1"), ("legacy", "storage_fee"): Decimal(-9)}
    rows = {(r["project_id"], r["line_type"]): r["quantity"] for r in export_rows(db_url, "2026-05")}
    assert rows[("legacy", "storage_fee")] == "-9"  # the adjustment row, listed after the regular one
    # The sum of the month's invoices is what the rules give on today's data.
    total = {}
    for r in export_rows(db_url, "2026-05"):
        key = (r["project_id"], r["line_type"])
        total[key] = total.get(key, Decimal(0)) + Decimal(r["amount"])
    assert total[("legacy", "storage_fee")] == Decimal(20)
    assert total[("site", "cloud_page_views")] == Decimal("13.345")
    # The daily charges were corrected too.
    assert charges(db_url, date(2026, 5, 1), date(2026, 5, 31))[("legacy", "storage_fee")] == (
        20,
        Decimal(20),
    )


def test_a_second_adjustment_bills_only_what_the_regular_invoice_and_the_first_one_left_out(db_url: str):
    may_data().write_url(db_url)
    ok(db_url, "month-end", "--month", "2026-05")
    SourceData().cloud("site", "2026-05-25", "page_views", "1000").write_url(db_url)
    with at(JUNE_1 + timedelta(days=3)):
        ok(db_url, "month-end", "--month", "2026-05")
    # More late usage of the same project and metric, and of another one.
    SourceData().cloud("site", "2026-05-26", "page_views", "3000").cloud(
        "site", "2026-05-26", "domains", "1"
    ).write_url(db_url)
    with at(JUNE_1 + timedelta(days=4)):
        second = summary(ok(db_url, "month-end", "--month", "2026-05"))
    assert second["invoices"] == 1
    adjustments = [
        (r["invoice_sequence"], r["project_id"], r["line_type"], Decimal(r["amount"]))
        for r in export_rows(db_url, "2026-05")
        if r["invoice_kind"] == "adjustment"
    ]
    assert adjustments == [
        ("1", "site", "cloud_page_views", Decimal(1)),
        ("2", "site", "cloud_page_views", Decimal(3)),
        ("2", "site", "cloud_domains", Decimal("0.1")),
    ]
    # The three invoices together are the month: a re-close finds nothing to adjust.
    with at(JUNE_1 + timedelta(days=5)):
        again = summary(ok(db_url, "month-end", "--month", "2026-05"))
    assert (again["invoices"], again["invoice_lines"], again["rows_inserted"]) == (0, 0, 0)
    invoices = {r["invoice_id"] for r in export_rows(db_url, "2026-05")}
    assert len(invoices) == 4  # acct-2's regular and two adjustments, the other account's regular


def test_a_back_dated_archive_after_nightly_is_corrected_by_month_end(db_url: str):
    SourceData().project("p1", created=LEGACY).project("p2", created=LEGACY).write_url(db_url)
    ok(db_url, "nightly")
    assert charges(db_url, date(2026, 5, 1), date(2026, 5, 31))[("p1", "storage_fee")] == (29, Decimal(29))

    SourceData().event("p1", "2026-05-10 00:00", "archived").write_url(db_url)
    result = ok(db_url, "month-end", "--month", "2026-05")

    # p1's days 1..29, one period, become days 1..9: one period deleted, one written.
    done = summary(result)
    assert (done["rows_deleted"], done["rows_inserted"]) == (1, 1)
    may = charges(db_url, date(2026, 5, 1), date(2026, 5, 31))
    assert may == {("p1", "storage_fee"): (9, Decimal(9)), ("p2", "storage_fee"): (29, Decimal(29))}
    assert line_amounts(db_url, "2026-05") == {
        ("p1", "storage_fee"): Decimal(9),
        ("p2", "storage_fee"): Decimal(29),
    }
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            quantity = conn.execute(
                select(invoice_lines.c.quantity_units).where(invoice_lines.c.project_id == "p1")
            ).scalar_one()
    finally:
        engine.dispose()
    assert quantity == 9 * 10_000


def test_month_end_bills_the_days_nightly_missed(db_url: str):
    SourceData().project("p1", created=LEGACY).write_url(db_url)
    with at(datetime(2026, 5, 11, 1, 0, tzinfo=UTC)):
        ok(db_url, "nightly")
    ok(db_url, "month-end", "--month", "2026-05")
    assert billed(db_url)[-1] == date(2026, 5, 31)
    assert charges(db_url, date(2026, 5, 1), date(2026, 5, 31)) == {("p1", "storage_fee"): (29, Decimal(29))}
    again = ok(db_url, "nightly")
    assert "nothing to bill" in again.stdout


def test_compute_usage_counts_towards_the_waiver_of_its_local_billing_month(db_url: str, tmp_path: Path):
    data = SourceData().project("early", created=LEGACY).project("late", created=LEGACY, account="acct-2")
    data.compute("early", "2026-04-30 16:00", "30")  # 2026-05-01 00:00 in Shanghai: counts for May
    data.compute("late", "2026-05-31 16:00", "30")  # 2026-06-01 00:00 in Shanghai: counts for June
    data.compute("late", "2026-05-31 15:59:59", "0")
    data.write_url(db_url)
    shanghai = tmp_path / "billing.toml"
    shanghai.write_text('[billing]\ntimezone = "Asia/Shanghai"\n')
    ok(db_url, "--config", str(shanghai), "month-end", "--month", "2026-05")
    assert line_amounts(db_url, "2026-05") == {
        ("early", "storage_fee"): Decimal(29),
        ("early", "storage_refund"): Decimal(-29),
        ("late", "storage_fee"): Decimal(29),
    }
