"""Charges stored as periods, through the commands, on both back ends: a quiet night
writes no charge row, a change writes only the projects it touches, and a month is
stored in a few rows per project."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, date, datetime

import pytest
import sqlalchemy as sa
import time_machine
from support import CliResult, SourceData, charge_days, run_cli

from billing_jobs.db.billing_tables import charge_periods
from billing_jobs.rules.calendar import Month

LEGACY = "2025-11-02"


@pytest.fixture(autouse=True)
def clock() -> Iterator[None]:
    with time_machine.travel(datetime(2026, 6, 1, 3, 0, tzinfo=UTC), tick=True):
        yield


def _summary(result: CliResult) -> dict[str, int]:
    assert result.code == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    found = [e for e in events if e["event"] == "run.summary"]
    assert len(found) == 1, result.stderr
    return found[0]  # type: ignore[no-any-return]


def _platform() -> SourceData:
    data = SourceData()
    for i in range(6):
        data.project(f"p{i}", created=LEGACY, account=f"acct-{i % 2}")
    data.project("site", created=LEGACY, account="acct-0").event("site", "2026-05-02 10:00", "published")
    data.cloud("site", "2026-05-09", "page_views", "1000")
    data.cloud("site", "2026-05-10", "page_views", "1000")
    return data


def _periods(db_url: str, month: str = "2026-05", charge_type: str | None = None) -> int:
    """The stored periods of the month (of one charge type)."""
    engine = sa.create_engine(db_url)
    first = date.fromisoformat(f"{month}-01")
    last = Month.of(first).last_day
    try:
        with engine.connect() as conn:
            cp = charge_periods.c
            query = sa.select(sa.func.count()).where(cp.first_day.between(first, last))
            if charge_type is not None:
                query = query.where(cp.charge_type == charge_type)
            return int(conn.execute(query).scalar_one())
    finally:
        engine.dispose()


def test_a_quiet_night_writes_no_charge_row_and_a_change_writes_only_its_projects(db_url: str) -> None:
    _platform().write_url(db_url)
    first = _summary(run_cli(db_url, "nightly", "--date", "2026-05-10"))
    assert first["storage_charges"] == 7
    assert first["rows_inserted"] == 7 + 1  # a storage fee per project to the month's end, a cloud fee
    stored = _periods(db_url)

    quiet = _summary(run_cli(db_url, "nightly", "--date", "2026-05-11"))

    assert (quiet["rows_inserted"], quiet["rows_deleted"]) == (0, 0)
    assert quiet["storage_charges"] == 7  # charged all the same: the stored periods hold the day
    assert quiet["days_billed"] == 1
    assert _periods(db_url) == stored
    billed = [r for r in charge_days(db_url, billed_only=True) if r[1] == "storage_fee"]
    assert len(billed) == 7 * 2  # May 10 and May 11

    # p3 archived on the 12th, the site's page views on the 12th: two projects change.
    late = SourceData()
    late.event("p3", "2026-05-12 13:00", "archived")
    late.cloud("site", "2026-05-12", "page_views", "500")
    late.write_url(db_url)
    changed = _summary(run_cli(db_url, "nightly", "--date", "2026-05-12"))
    # p3's storage fee to the month's end, and the site's page views of May (the 10th) ...
    assert changed["rows_deleted"] == 2
    # ... become p3's storage fee to the 12th, and the site's page views of May (10th, 12th).
    assert changed["rows_inserted"] == 2
    assert _periods(db_url, charge_type="cloud_page_views") == 1
    days = [r for r in charge_days(db_url) if r[0] == "site" and r[1] == "cloud_page_views"]
    assert [r[2] for r in days] == ["2026-05-10", "2026-05-12"]


def test_a_dry_run_shows_the_day_it_bills_and_stores_nothing(db_url: str) -> None:
    _platform().write_url(db_url)
    assert run_cli(db_url, "nightly", "--date", "2026-05-10").code == 0
    before = charge_days(db_url)

    preview = run_cli(db_url, "nightly", "--date", "2026-05-11", "--dry-run")

    assert preview.code == 0, preview.stderr
    storage_line = next(line for line in preview.stdout.splitlines() if "storage_fee" in line)
    assert storage_line.split("│")[2].strip() == "7"  # one day of 7 projects, not the month's rest
    assert charge_days(db_url) == before


def test_a_month_closed_after_nightly_every_day_is_stored_in_its_canonical_periods(db_url: str) -> None:
    """Storage fee: one period per project (days 1..29, the cap leaving 30 and 31 free);
    the site's page views: one per run of equal days (the 9th and 10th: one)."""
    _platform().write_url(db_url)
    assert run_cli(db_url, "nightly", "--date", "2026-05-01").code == 0
    with time_machine.travel(datetime(2026, 5, 20, 3, 0, tzinfo=UTC), tick=False):
        assert run_cli(db_url, "nightly").code == 0  # catch-up: from the effective date to May 19
    assert run_cli(db_url, "nightly").code == 0  # to May 31
    after_nightly = charge_days(db_url)
    closed = _summary(run_cli(db_url, "month-end", "--month", "2026-05"))

    assert (closed["rows_inserted"], closed["rows_deleted"]) == (0, 0)
    assert charge_days(db_url) == after_nightly
    storage = [r for r in after_nightly if r[1] == "storage_fee" and r[2].startswith("2026-05")]
    assert len(storage) == 7 * 29
    assert _periods(db_url) == 7 + 1  # a storage fee per project, the page views


def test_a_month_row_edited_into_nonsense_stops_a_nightly_with_its_name_and_a_month_end_rewrites_it(
    db_url: str,
) -> None:
    """The site's page views of May edited by hand so that they no longer read back: a
    nightly that must read the row back (a re-run of a day it holds) fails naming it;
    the month's close (which compares whole months without reading them back)
    rewrites it to the days the rules give."""
    _platform().write_url(db_url)
    for day in ("2026-05-09", "2026-05-10"):
        assert run_cli(db_url, "nightly", "--date", day).code == 0
    before = charge_days(db_url)
    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as conn:
            cp = charge_periods.c
            edited = conn.execute(
                sa.update(charge_periods)
                .where(cp.project_id == "site", cp.charge_type == "cloud_page_views")
                .values(daily="0 1 x")
            ).rowcount
        assert edited == 1
    finally:
        engine.dispose()

    night = run_cli(db_url, "nightly", "--date", "2026-05-10")

    assert night.code == 1, night.stderr
    assert "project site, cloud_page_views, first_day 2026-05-09" in night.stderr
    closed = run_cli(db_url, "month-end", "--month", "2026-05")
    assert closed.code == 0, closed.stderr
    views = [r for r in charge_days(db_url) if r[1] == "cloud_page_views"]
    assert [r[2] for r in views] == ["2026-05-09", "2026-05-10"]
    assert views == [r for r in before if r[1] == "cloud_page_views"]
