"""`billing-jobs reconcile`: closed months against their source data and daily charges.

Through the command line on SQLite and PostgreSQL, each step at its own instant:
May and June are closed; late compute usage (crossing the waiver threshold) and
a late cloud row make May differ; its re-close makes it agree again; a daily
charge changed in the database is reported; `status` shows the differing month;
the scheduler's reconcile job re-closes a differing month when `auto_adjust` is on.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import time_machine
from sqlalchemy import Executable, Select, create_engine, insert, select
from support import SourceData, day_of, holding_writer_lock, rewrite_charge_days, run_cli

from billing_jobs.db.billing_tables import (
    billing_runs,
    invoice_lines,
    invoices,
    month_reconciles,
)
from billing_jobs.scheduler import JobRunner, inprocess_runner, job_by_id, reconcile_and_adjust
from billing_jobs.settings import load_settings

CLOSED = datetime(2026, 7, 2, 6, 0, tzinfo=UTC)


def at(day: int, hour: int = 6) -> time_machine.travel:
    return time_machine.travel(datetime(2026, 7, day, hour, 0, tzinfo=UTC), tick=False)


@pytest.fixture
def closed_db(db_url: str) -> str:
    """acct-a: a legacy project with 29 credits of compute in May (under the waiver's 30);
    acct-b: a legacy project published in May with page views; May and June closed."""
    data = SourceData()
    data.project("pa", created="2025-11-02", account="acct-a")
    data.compute("pa", "2026-05-03 10:00", "0.1", count=290)
    data.project("pb", created="2025-11-02", account="acct-b")
    data.event("pb", "2026-05-03 09:00", "published")
    data.cloud("pb", "2026-05-05", "page_views", "12345")
    data.write_url(db_url)
    with time_machine.travel(CLOSED, tick=False):
        for month in ("2026-05", "2026-06"):
            result = run_cli(db_url, "month-end", "--month", month, "--workers", "1")
            assert result.code == 0, result.stderr
    return db_url


def late_data(db_url: str) -> None:
    """One more credit of compute in May (pa reaches 30: its storage fee is waived) and
    a late page-views row of pb (+1 credit)."""
    data = SourceData()
    data.compute("pa", "2026-05-20 10:00", "1")
    data.cloud("pb", "2026-05-06", "page_views", "1000")
    data.write_url(db_url)


def reconcile(db_url: str, *args: str) -> tuple[int, str, str]:
    result = run_cli(db_url, "reconcile", "--workers", "1", *args)
    return result.code, result.stdout, result.stderr


def table_rows(stdout: str) -> list[list[str]]:
    """The rows of the printed differences (the header left out)."""
    return [line.split() for line in stdout.splitlines() if line.startswith("20") and ": " not in line]


def execute(db_url: str, *statements: Executable) -> list[int]:
    """Run statements in one transaction; their row counts."""
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            return [conn.execute(stmt).rowcount for stmt in statements]
    finally:
        engine.dispose()


def fetch(db_url: str, stmt: Select[Any]) -> list[tuple[Any, ...]]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(stmt)]
    finally:
        engine.dispose()


def recorded(db_url: str) -> list[tuple[Any, ...]]:
    """(period, status, differences, difference_units) of every check, in order."""
    mr = month_reconciles.c
    columns = select(mr.period, mr.status, mr.differences, mr.difference_units)
    return fetch(db_url, columns.order_by(mr.checked_at, mr.period))


def runs(db_url: str, *columns: Any) -> list[tuple[Any, ...]]:
    return fetch(db_url, select(*columns).order_by(billing_runs.c.started_at))


def scheduled_reconcile(db_url: str, config: Path | None, now: datetime) -> int | None:
    """The scheduler's reconcile job, with `now` passed in; each command it runs ticks on from it."""
    settings = load_settings(config)
    with time_machine.travel(now, tick=True):
        runner = JobRunner(inprocess_runner(db_url, None if config is None else str(config)))
        return reconcile_and_adjust(runner, job_by_id(settings, "reconcile"), db_url, settings, now)


def test_a_closed_month_reconciles_clean_and_late_data_makes_it_differ_until_re_closed(
    closed_db: str,
) -> None:
    db_url = closed_db
    with at(3):
        code, out, err = reconcile(db_url, "--month", "2026-05")
    assert code == 0, err
    assert table_rows(out) == []
    assert "2026-05: ok" in out
    assert recorded(db_url) == [("2026-05", "ok", 0, 0)]

    late_data(db_url)
    with at(4):
        code, out, err = reconcile(db_url, "--month", "2026-05")
    assert code == 1, err
    assert table_rows(out) == [
        ["2026-05", "recomputed", "acct-a", "storage_refund", "0", "-29", "-29"],
        ["2026-05", "recomputed", "acct-b", "cloud_page_views", "12.345", "13.345", "1"],
        # the credits ledger: the late compute is one more credit of arrears
        ["2026-05", "ledger", "acct-a", "-", "arrears", "58", "59", "1"],
    ]
    assert "2026-05: differs: 3 difference(s) (2 recomputed, 0 stored, 1 ledger), 31 credits" in out
    assert "billing-jobs month-end --month 2026-05" in out
    assert "billing-jobs month-end --month 2026-06 --ledger-from 2026-05" in out
    assert recorded(db_url)[-1] == ("2026-05", "differs", 3, 310_000)

    with at(4):  # the same whatever the chunks and workers
        code, out, _ = reconcile(
            db_url, "--month", "2026-05", "--json", "--projects-per-chunk", "1", "--workers", "2"
        )
    assert code == 1
    found = json.loads(out)
    assert found["status"] == "differs"
    (may,) = found["months"]
    assert may["recomputed"][0] == {
        "account_id": "acct-a",
        "line_type": "storage_refund",
        "invoiced": "0",
        "recomputed": "-29",
        "difference": "-29",
        "invoiced_quantity": "0",
        "recomputed_quantity": "1",
    }
    assert may["stored"] == []
    assert [(r["account_id"], r["line_type"], r["difference"]) for r in may["recomputed"]] == [
        ("acct-a", "storage_refund", "-29"),
        ("acct-b", "cloud_page_views", "1"),
    ]
    assert may["ledger"] == [
        {
            "account_id": "acct-a",
            "lot_id": "",
            "kind": "arrears",
            "written": "58",
            "recomputed": "59",
            "difference": "1",
            "written_money": "0.00",
            "recomputed_money": "0.00",
        }
    ]
    assert may["difference_abs"] == "31"

    with at(5):
        assert run_cli(db_url, "month-end", "--month", "2026-05", "--workers", "1").code == 0
        code, out, err = reconcile(db_url, "--month", "2026-05")
    assert code == 0, out + err
    assert "2026-05: ok" in out
    br = billing_runs.c
    reconciles = select(br.status, br.period).where(br.job == "reconcile")
    assert fetch(db_url, reconciles) == [("succeeded", "2026-05")] * 4


def test_a_month_not_closed_or_both_options_are_usage_errors(db_url: str) -> None:
    with at(3):
        code, out, err = reconcile(db_url, "--month", "2026-04")
        both = run_cli(db_url, "reconcile", "--month", "2026-05", "--since", "2026-05")
        none = run_cli(db_url, "reconcile")
    assert (code, out) == (2, "")
    assert "month 2026-04 is not closed: close it first" in err
    assert both.code == 2
    assert "not both" in both.stderr
    assert (none.code, none.stdout) == (0, "no closed month to reconcile\n")


def test_a_daily_charge_changed_in_the_database_is_reported_and_shown_by_status(
    closed_db: str, tmp_path: Path
) -> None:
    db_url = closed_db

    def tamper(days: pd.DataFrame) -> pd.DataFrame:
        hit = (days["project_id"] == "pa") & (days["charge_type"] == "storage_fee")
        hit &= days["day"] == day_of("2026-05-10")
        assert int(hit.sum()) == 1
        return days.assign(amount_units=days["amount_units"] + 5000 * hit)

    rewrite_charge_days(db_url, tamper)
    with at(3):
        code, out, err = reconcile(db_url)  # the last reconcile_months (3) closed months: May and June
    assert code == 1, err
    assert table_rows(out) == [["2026-05", "stored", "acct-a", "storage_fee", "29", "29.5", "0.5"]]
    assert "2026-05: differs: 1 difference(s) (0 recomputed, 1 stored), 0.5 credits" in out
    assert "2026-06: ok" in out

    with at(3, 7):
        status = run_cli(db_url, "status")
        as_json = run_cli(db_url, "status", "--json")
    assert status.code == 1
    assert any("2026-05" in line and "reconcile" in line for line in status.stdout.splitlines())
    record = json.loads(as_json.stdout)
    assert as_json.code == 1
    assert [m["period"] for m in record["reconcile_differs"]] == ["2026-05"]
    assert record["reconcile_differs"][0]["differences"] == 1

    with at(4):  # --since leaves May out
        code, out, _ = reconcile(db_url, "--since", "2026-06")
    assert code == 0
    assert "2026-06: ok" in out
    assert "2026-05" not in out

    # The scheduler's job from the command line, auto_adjust on: May's re-close puts
    # the daily charge right (no invoice changes) and its check agrees again.
    config = tmp_path / "billing.toml"
    config.write_text("[schedule]\nauto_adjust = true\n", encoding="utf-8")
    with time_machine.travel(datetime(2026, 7, 5, 3, 30, tzinfo=UTC), tick=True):
        once = run_cli(db_url, "--config", str(config), "schedule", "--once", "reconcile")
    assert once.code == 0, once.stderr
    assert [r[:2] for r in recorded(db_url)][-3:] == [
        ("2026-05", "differs"),
        ("2026-06", "ok"),
        ("2026-05", "ok"),
    ]


def test_a_close_running_during_the_check_is_reported_busy_not_as_differences(closed_db: str) -> None:
    """Drafts of the month while a writer holds its lease: a close is half-way, so the
    month is `busy` (exit 75), not differing; drafts left by a close that died are not
    invoices, and the check goes on without them."""
    db_url = closed_db
    late_data(db_url)
    draft = {
        "invoice_id": "ADJ-2026-05-acct-a-001",
        "account_id": "acct-a",
        "period": "2026-05",
        "kind": "adjustment",
        "sequence": 1,
        "status": "draft",
        "total_units": -290_000,
        "line_count": 1,
        "run_id": "other-run",
        "created_at": datetime(2026, 7, 3, 5, 0, tzinfo=UTC).replace(tzinfo=None),
    }
    line = {
        "invoice_id": draft["invoice_id"],
        "project_id": "pa",
        "line_type": "storage_refund",
        "account_id": "acct-a",
        "period": "2026-05",
        "quantity_units": 10_000,
        "unit_price": "",
        "amount_units": -290_000,
    }
    execute(db_url, insert(invoices).values(**draft), insert(invoice_lines).values(**line))
    with holding_writer_lock(db_url), at(3):
        code, out, _ = reconcile(db_url, "--month", "2026-05")
    assert code == 75
    assert table_rows(out) == []
    assert "2026-05: busy" in out
    assert recorded(db_url) == [("2026-05", "busy", 0, 0)]

    # The writer is gone: its drafts are left-overs.
    with at(4):
        code, out, _ = reconcile(db_url, "--month", "2026-05")
    assert code == 1
    assert ["2026-05", "recomputed", "acct-a", "storage_refund", "0", "-29", "-29"] in table_rows(out)


def test_the_scheduled_reconcile_re_closes_a_differing_month_when_auto_adjust_is_on(
    closed_db: str, tmp_path: Path
) -> None:
    db_url = closed_db
    late_data(db_url)
    # auto_adjust off (the default): the differing month is only reported.
    assert scheduled_reconcile(db_url, None, datetime(2026, 7, 3, 3, 30, tzinfo=UTC)) == 1
    assert [r[:2] for r in recorded(db_url)] == [("2026-05", "differs"), ("2026-06", "ok")]

    config = tmp_path / "billing.toml"
    config.write_text("[schedule]\nreconcile_months = 2\nauto_adjust = true\n", encoding="utf-8")
    assert scheduled_reconcile(db_url, config, datetime(2026, 7, 4, 3, 30, tzinfo=UTC)) == 0
    # May differed again, was re-closed (one adjustment) and checked again: ok.
    assert [r[:2] for r in recorded(db_url)][2:] == [
        ("2026-05", "differs"),
        ("2026-06", "ok"),
        ("2026-05", "ok"),
    ]
    assert runs(db_url, billing_runs.c.job, billing_runs.c.period)[-3:] == [
        ("reconcile", "2026-05..2026-06"),
        ("month-end", "2026-05"),
        ("reconcile", "2026-05"),
    ]
