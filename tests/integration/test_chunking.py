"""Chunks are an implementation detail: any chunk size gives the same charges and invoices."""

from __future__ import annotations

from datetime import date, datetime

import pytest
import sqlalchemy as sa
from support import SourceData, export_text, run_cli

from billing_jobs.db.billing_tables import billing_metadata, charge_periods, invoice_lines, rejects
from billing_jobs.db.engine import make_engine, upgrade
from billing_jobs.db.reads import accounts_charged


def _platform(db_url: str) -> None:
    """Seven accounts, their projects spread over both sides of the effective date."""
    data = SourceData()
    for a in range(7):
        account = f"acct-{a}"
        for p in range(a % 3 + 1):
            pid = f"prj-{a}-{p}"
            data.project(pid, created=f"2026-0{(a + p) % 5 + 1}-1{p} 08:00", account=account)
            if p == 1:
                data.event(pid, "2026-05-10 09:00", "archived")
                data.event(pid, "2026-05-20 00:00", "restored")
            if a % 2 == 0:
                data.event(pid, "2026-05-03 10:00", "published")
                data.cloud(pid, "2026-05-04", "page_views", str(1000 * (a + 1)), usage_id=f"cl-{pid}-a")
                data.cloud(pid, "2026-05-02", "page_views", "5", usage_id=f"cl-{pid}-b")  # not published yet
            for i in range(100 * (a % 4)):
                data.compute(pid, "2026-05-15 12:00", "0.1", usage_id=f"cu-{pid}-{i}")
    data.compute("nope", "2026-05-02 00:00", "1", usage_id="cu-nope")  # unknown project: rejected
    data.write_url(db_url)


def _table(db_url: str, table: sa.Table) -> list[tuple[object, ...]]:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            columns = [
                c for c in table.c if c.name not in ("run_id", "recorded_at", "first_run_id", "first_seen_at")
            ]
            return sorted(tuple(r) for r in conn.execute(sa.select(*columns)))
    finally:
        engine.dispose()


def _reset_jobs_tables(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as conn:
            for table in reversed(billing_metadata.sorted_tables):
                conn.execute(sa.delete(table))
    finally:
        engine.dispose()


def _bill(db_url: str, *extra: str) -> dict[str, list[tuple[object, ...]]]:
    for args in (["nightly", "--date", "2026-05-12"], ["month-end", "--month", "2026-05"]):
        result = run_cli(db_url, *args, *extra)
        assert result.code == 0, result.stderr
    tables = {t.name: _table(db_url, t) for t in (charge_periods, invoice_lines, rejects)}
    tables["export"] = [(line.rsplit(",", 1)[0],) for line in export_text(db_url, "2026-05").splitlines()]
    return tables


@pytest.mark.parametrize("chunk", ["1", "2", "5"])
def test_any_chunk_size_gives_the_same_charges_invoices_and_rejects_as_one_chunk(
    db_url: str, chunk: str
) -> None:
    _platform(db_url)
    whole = _bill(db_url)
    _reset_jobs_tables(db_url)

    chunked = _bill(db_url, "--projects-per-chunk", chunk)

    assert chunked == whole
    assert len(chunked["invoice_lines"]) > 10
    assert {r[2] for r in chunked["rejects"]} >= {"not_published_that_day", "unknown_project"}


def test_the_accounts_charged_in_a_period_are_found_by_index_jumps_exactly(db_url: str) -> None:
    """`accounts_charged` walks the (account, day) index; it names exactly the accounts a
    `SELECT DISTINCT` over the period's charges names, whatever the ids look like."""
    engine = make_engine(db_url)
    ids = ["Acc-1", "acc-2", "_acc 3", "Zed-4", "zed-5", "é-6", "acct-7"]
    days = {  # per account, the days it was charged
        "Acc-1": [date(2026, 4, 30), date(2026, 5, 1)],
        "acc-2": [date(2026, 4, 12)],
        "_acc 3": [date(2026, 5, 31)],
        "Zed-4": [date(2026, 6, 1)],
        "zed-5": [date(2026, 5, 15), date(2026, 5, 16)],
        "é-6": [date(2026, 3, 1), date(2026, 7, 1)],
        "acct-7": [],
    }
    rows = [
        {
            "project_id": f"p-{ids.index(a)}",
            "charge_type": "storage_fee",
            "first_day": d,
            "last_day": d,
            "days": 1,
            "account_id": a,
            "quantity_units": 10_000,
            "amount_units": 10_000,
            "run_id": "r",
            "recorded_at": datetime(2026, 6, 1),  # noqa: DTZ001  # naive UTC, as the jobs store it
        }
        for a in ids
        for d in days[a]
    ]
    try:
        upgrade(engine)
        with engine.begin() as conn:
            conn.execute(charge_periods.insert(), rows)
        with engine.connect() as conn:
            for first, last in [
                (date(2026, 5, 1), date(2026, 5, 31)),
                (date(2026, 4, 1), date(2026, 4, 30)),
                (date(2026, 1, 1), date(2026, 12, 31)),
                (date(2025, 1, 1), date(2025, 12, 31)),
            ]:
                found = [a for (a,) in conn.execute(accounts_charged(first, last))]
                distinct = conn.execute(
                    sa.select(charge_periods.c.account_id)
                    .where(charge_periods.c.first_day.between(first, last))
                    .distinct()
                )
                assert sorted(found) == sorted(a for (a,) in distinct)
                assert len(found) == len(set(found))
                expected = {a for a in ids if any(first <= d <= last for d in days[a])}
                assert set(found) == expected
    finally:
        engine.dispose()
