"""Guards and controls around closing a month, through the command line on both back ends.

- Period guards: `nightly --date` for a day before the effective date, not yet ended,
  or inside a closed month, and `month-end` for a month before the effective date,
  exit 2 with a line that says what to run instead.
- Settings pinned per month: a re-close (or its preview) with other billing settings
  exits 2 naming the changed keys, unless `--reprice`.
- `[monitoring] adjustment_confirm_share`: a larger re-close shows its differences
  and exits 2 unless `--confirm`.
- Finance approval: `--hold` writes drafts only; `--approve M` finalizes them while
  they equal a fresh computation, else exits 1 with the differences.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import time_machine
from sqlalchemy import create_engine, func, select
from support import SourceData, export_rows, export_text, ok, run_cli

from billing_jobs.db.billing_tables import (
    billing_runs,
    charge_periods,
    credit_periods,
    invoices,
    month_closes,
    month_holds,
)
from billing_jobs.settings import DEFAULT_CONFIG_TEXT

NOW = datetime(2026, 7, 15, 12, 0, tzinfo=UTC)
LEGACY = "2025-11-02"


@pytest.fixture(autouse=True)
def frozen_clock() -> Iterator[None]:
    with time_machine.travel(NOW, tick=False):
        yield


def config(tmp_path: Path, name: str, *replacements: tuple[str, str]) -> str:
    text = DEFAULT_CONFIG_TEXT
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / f"{name}.toml"
    path.write_text(text, "utf-8")
    return str(path)


CAP_25 = ('monthly_cap = "29"', 'monthly_cap = "25"')
SHARE_5 = ('adjustment_confirm_share = ""', 'adjustment_confirm_share = "0.05"')
APPROVAL = ("require_approval = false", "require_approval = true")


def two_projects(db_url: str) -> None:
    data = SourceData().project("p1", created=LEGACY).project("p2", created=LEGACY, account="acct-2")
    data.compute("p1", "2026-05-03 10:00", "29.5").compute("p2", "2026-05-04 10:00", "1")
    data.write_url(db_url)


def count(db_url: str, table, *where) -> int:  # type: ignore[no-untyped-def]
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one())
    finally:
        engine.dispose()


def last_run(db_url: str) -> tuple[dict[str, object], dict[str, object], str]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                select(billing_runs.c.arguments, billing_runs.c.counts, billing_runs.c.status)
                .where(billing_runs.c.job == "month-end")
                .order_by(billing_runs.c.started_at.desc(), billing_runs.c.finished_at.desc())
                .limit(1)
            ).one()
    finally:
        engine.dispose()
    return json.loads(row.arguments), json.loads(row.counts or "{}"), row.status


def refused(db_url: str, code: int, *args: str) -> str:
    result = run_cli(db_url, *args)
    assert result.code == code, (result.stdout, result.stderr)
    return result.stderr


# --- Period guards ----------------------------------------------------------------------


def test_nightly_refuses_days_before_the_effective_date_not_ended_or_in_a_closed_month(db_url: str) -> None:
    two_projects(db_url)
    before = refused(db_url, 2, "nightly", "--date", "2026-03-23")
    assert "before the effective date 2026-03-24" in before
    assert before.count("\n") == 1
    not_ended = refused(db_url, 2, "nightly", "--date", "2026-07-15")
    assert "has not ended yet" in not_ended
    assert "latest billable day: 2026-07-14" in not_ended

    ok(db_url, "nightly", "--date", "2026-05-10")
    ok(db_url, "month-end", "--month", "2026-05")
    charges = count(db_url, charge_periods)
    closed = refused(db_url, 2, "nightly", "--date", "2026-05-10")
    assert "month 2026-05, which is closed" in closed
    assert "billing-jobs month-end --month 2026-05" in closed
    assert count(db_url, charge_periods) == charges
    # A preview writes nothing and stays allowed; a day of an open month is billed.
    ok(db_url, "nightly", "--date", "2026-05-10", "--dry-run")
    ok(db_url, "nightly", "--date", "2026-06-10")


def test_month_end_refuses_a_month_before_the_effective_date_even_as_a_preview(db_url: str) -> None:
    two_projects(db_url)
    for extra in ((), ("--dry-run",)):
        stderr = refused(db_url, 2, "month-end", "--month", "2026-02", *extra)
        assert "ends before the effective date 2026-03-24" in stderr
    ok(db_url, "month-end", "--month", "2026-03")  # the effective date's month closes
    assert "has not ended" in refused(db_url, 2, "month-end", "--month", "2026-07")


# --- Settings pinned per month -------------------------------------------------------------


def test_a_re_close_with_other_settings_names_the_keys_and_needs_reprice(db_url: str, tmp_path: Path) -> None:
    two_projects(db_url)
    ok(db_url, "month-end", "--month", "2026-05")
    before = export_text(db_url, "2026-05")
    runs = count(db_url, billing_runs)
    cheaper = config(tmp_path, "cap25", CAP_25)

    for extra in ((), ("--dry-run",)):
        stderr = refused(db_url, 2, "--config", cheaper, "month-end", "--month", "2026-05", *extra)
        assert "monthly_cap: '29' -> '25'" in stderr
        assert "--reprice" in stderr
    assert export_text(db_url, "2026-05") == before
    assert count(db_url, billing_runs) == runs  # refused before any run was recorded
    # Another month is not pinned by this one.
    ok(db_url, "--config", cheaper, "month-end", "--month", "2026-06", "--dry-run")

    ok(db_url, "--config", cheaper, "month-end", "--month", "2026-05", "--reprice")
    arguments, counts, status = last_run(db_url)
    assert status == "succeeded"
    assert arguments["reprice"] is True
    assert counts["repriced"] == ["monthly_cap: '29' -> '25'"]
    adjustments = sorted(
        (r["project_id"], r["line_type"], r["amount"])
        for r in export_rows(db_url, "2026-05")
        if r["invoice_kind"] == "adjustment"
    )
    assert adjustments == [("p1", "storage_fee", "-4"), ("p2", "storage_fee", "-4")]

    # Now pinned to the new settings: a repeat changes nothing; the old ones need --reprice.
    after = export_text(db_url, "2026-05")
    ok(db_url, "--config", cheaper, "month-end", "--month", "2026-05")
    assert export_text(db_url, "2026-05") == after
    assert "monthly_cap: '25' -> '29'" in refused(db_url, 2, "month-end", "--month", "2026-05")


# --- The adjustment share ------------------------------------------------------------------


def test_a_large_re_close_shows_its_differences_and_needs_confirm(db_url: str, tmp_path: Path) -> None:
    careful = config(tmp_path, "share", SHARE_5)
    two_projects(db_url)
    ok(db_url, "--config", careful, "month-end", "--month", "2026-05")
    before = export_text(db_url, "2026-05")
    charges = count(db_url, charge_periods)

    # Late compute takes p1 over the waiver threshold: a refund of 29 of the month's 58.
    SourceData().compute("p1", "2026-05-31 23:00", "1").write_url(db_url)
    result = run_cli(db_url, "--config", careful, "month-end", "--month", "2026-05")
    assert result.code == 2, result.stderr
    assert "ADJ-2026-05-acct-1-001" in result.stdout  # the differences are shown
    assert "move 29 credits, more than 5% of its invoiced total of 58" in result.stderr
    assert "--confirm" in result.stderr.splitlines()[-1]
    assert export_text(db_url, "2026-05") == before
    assert count(db_url, charge_periods) == charges

    ok(db_url, "--config", careful, "month-end", "--month", "2026-05", "--confirm")
    adjustments = [r for r in export_rows(db_url, "2026-05") if r["invoice_kind"] == "adjustment"]
    assert [(r["project_id"], r["line_type"], r["amount"]) for r in adjustments] == [
        ("p1", "storage_refund", "-29")
    ]
    # Nothing left to adjust: no confirmation needed, nothing written.
    confirmed = export_text(db_url, "2026-05")
    ok(db_url, "--config", careful, "month-end", "--month", "2026-05")
    assert export_text(db_url, "2026-05") == confirmed


# --- Finance approval ------------------------------------------------------------------------


def test_hold_then_approve_equals_a_direct_close(db_url: str, tmp_path: Path) -> None:
    two_projects(db_url)
    stdout = ok(db_url, "month-end", "--month", "2026-05", "--hold")
    assert "held for approval" in stdout
    assert "month-end --approve 2026-05" in stdout
    assert export_rows(db_url, "2026-05") == []  # drafts are nobody's invoices yet
    assert count(db_url, month_closes) == 0
    assert count(db_url, month_holds) == 1
    assert count(db_url, invoices, invoices.c.status == "draft") == 2
    assert count(db_url, credit_periods) == 0  # the ledger follows the finalized invoices
    status = run_cli(db_url, "status", "--json")
    record = json.loads(status.stdout)
    may = next(m for m in record["unclosed_months"] if m["period"] == "2026-05")
    assert may["held_for_approval"] is True
    assert any("2026-05" in p and "month-end --approve 2026-05" in p for p in record["problems"])

    ok(db_url, "month-end", "--approve", "2026-05")
    assert count(db_url, month_holds) == 0
    assert count(db_url, month_closes) == 1
    assert count(db_url, credit_periods, credit_periods.c.period == "2026-05") == 1
    arguments, counts, _ = last_run(db_url)
    assert arguments["approve"] is True
    assert counts["invoices"] == 2

    direct = f"sqlite:///{tmp_path / 'direct.db'}"
    two_projects(direct)
    ok(direct, "month-end", "--month", "2026-05")
    assert export_text(db_url, "2026-05") == export_text(direct, "2026-05")

    # A repeat (or the re-run of an approval that died after finalizing) changes nothing.
    approved = export_text(db_url, "2026-05")
    assert "nothing held: the month is closed" in ok(db_url, "month-end", "--approve", "2026-05")
    assert export_text(db_url, "2026-05") == approved
    # A month neither held nor closed has nothing to approve.
    assert "no drafts of 2026-06 are held" in refused(db_url, 2, "month-end", "--approve", "2026-06")


def test_approve_refuses_drafts_that_no_longer_equal_a_fresh_computation(db_url: str) -> None:
    two_projects(db_url)
    ok(db_url, "month-end", "--month", "2026-05", "--hold")
    SourceData().compute("p1", "2026-05-31 23:00", "1").write_url(db_url)  # late data
    result = run_cli(db_url, "month-end", "--approve", "2026-05")
    assert result.code == 1, result.stderr
    assert "storage_refund" in result.stdout  # the line that differs is listed
    assert "differ from a fresh computation in 1 line(s); nothing was finalized" in result.stderr
    assert export_rows(db_url, "2026-05") == []
    assert count(db_url, month_holds) == 1

    ok(db_url, "month-end", "--month", "2026-05", "--hold")
    ok(db_url, "month-end", "--approve", "2026-05")
    refunds = [r for r in export_rows(db_url, "2026-05") if r["line_type"] == "storage_refund"]
    assert [(r["project_id"], r["amount"]) for r in refunds] == [("p1", "-29")]


def test_require_approval_holds_every_close_and_re_close(db_url: str, tmp_path: Path) -> None:
    strict = config(tmp_path, "strict", APPROVAL)
    two_projects(db_url)
    ok(db_url, "--config", strict, "month-end", "--month", "2026-05")
    assert count(db_url, month_closes) == 0
    assert count(db_url, month_holds) == 1
    ok(db_url, "--config", strict, "month-end", "--approve", "2026-05")
    assert len(export_rows(db_url, "2026-05")) == 2

    # A re-close after late data is held too, as adjustment drafts.
    SourceData().compute("p1", "2026-05-31 23:00", "1").write_url(db_url)
    ok(db_url, "--config", strict, "month-end", "--month", "2026-05")
    assert [r["invoice_kind"] for r in export_rows(db_url, "2026-05")] == ["regular", "regular"]
    ok(db_url, "--config", strict, "month-end", "--approve", "2026-05")
    kinds = sorted(r["invoice_kind"] for r in export_rows(db_url, "2026-05"))
    assert kinds == ["adjustment", "regular", "regular"]


def test_approval_flags_that_do_not_go_together_exit_2(db_url: str) -> None:
    two_projects(db_url)
    for args in (
        ("month-end", "--approve", "2026-05", "--month", "2026-05"),
        ("month-end", "--approve", "2026-05", "--dry-run"),
        ("month-end", "--month", "2026-05", "--hold", "--dry-run"),
        ("month-end", "--month", "2026-05", "--hold", "--shard", "0/2"),
        ("month-end", "--approve", "2026-13"),
    ):
        stderr = refused(db_url, 2, *args)
        assert stderr.count("\n") == 1, stderr


# --- Settings that change over time ---------------------------------------------------------

CHANGES_FROM_JUNE = """
[[changes]]
effective_from = "2026-06-01"
storage_fee = { monthly_cap = "25" }
"""
LATER_CHANGE = """
[[changes]]
effective_from = "2026-08-01"
cloud_fees = { page_views = "0.002" }
"""


def storage_totals(db_url: str, month: str) -> dict[str, str]:
    return {
        r["project_id"]: r["amount"] for r in export_rows(db_url, month) if r["line_type"] == "storage_fee"
    }


def test_a_change_applies_from_its_month_on_and_a_later_change_leaves_closed_months_alone(
    db_url: str, tmp_path: Path
) -> None:
    june = tmp_path / "june.toml"
    june.write_text(DEFAULT_CONFIG_TEXT + CHANGES_FROM_JUNE, "utf-8")
    two_projects(db_url)
    ok(db_url, "--config", str(june), "month-end", "--month", "2026-05")
    ok(db_url, "--config", str(june), "month-end", "--month", "2026-06")
    assert storage_totals(db_url, "2026-05") == {"p1": "29", "p2": "29"}
    assert storage_totals(db_url, "2026-06") == {"p1": "25", "p2": "25"}

    # A price change announced for August: May and June re-close without --reprice, unchanged.
    later = tmp_path / "later.toml"
    later.write_text(DEFAULT_CONFIG_TEXT + CHANGES_FROM_JUNE + LATER_CHANGE, "utf-8")
    before = export_text(db_url, "2026-05"), export_text(db_url, "2026-06")
    ok(db_url, "--config", str(later), "month-end", "--month", "2026-05")
    ok(db_url, "--config", str(later), "month-end", "--month", "2026-06")
    assert (export_text(db_url, "2026-05"), export_text(db_url, "2026-06")) == before

    # Changing June's own price after June was closed is a reprice of June only.
    other = tmp_path / "other.toml"
    other.write_text(DEFAULT_CONFIG_TEXT + CHANGES_FROM_JUNE.replace('"25"', '"20"'), "utf-8")
    ok(db_url, "--config", str(other), "month-end", "--month", "2026-05")
    assert "monthly_cap: '25' -> '20'" in refused(
        db_url, 2, "--config", str(other), "month-end", "--month", "2026-06"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ('effective_from = "2026-06-02"', "first day of a billing month"),
        (
            'effective_from = "2026-06-01"\nstorage_fee = { cap = "3" }',
            "unknown key 'changes.0.storage_fee.cap'",
        ),
        ('effective_from = "2026-06-01"\ncloud_fees = { domains = "-1" }', "changes.0.cloud_fees.domains"),
        (
            'effective_from = "2026-06-01"\n[[changes]]\neffective_from = "2026-06-01"',
            "'changes.1.effective_from': dates must be strictly increasing",
        ),
    ],
)
def test_bad_changes_exit_2_naming_the_key(tmp_path: Path, change: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(DEFAULT_CONFIG_TEXT + "\n[[changes]]\n" + change + "\n", "utf-8")
    result = run_cli(f"sqlite:///{tmp_path / 'x.db'}", "--config", str(path), "status")
    assert result.code == 2
    assert message in result.stderr
    assert result.stderr.count("\n") == 1
