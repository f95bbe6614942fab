"""Chunks are an implementation detail: any chunk size gives the same charges and invoices."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from support import SourceData, export_text, run_cli

from billing_jobs.db.billing_tables import billing_metadata, daily_charges, invoice_lines, rejects


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
    tables = {t.name: _table(db_url, t) for t in (daily_charges, invoice_lines, rejects)}
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
