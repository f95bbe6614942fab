"""Bad source rows: recorded in `rejects` with their reason, counted, never fatal.

See billing-rules.md, Bad input.

Every test runs on SQLite and PostgreSQL (`db_url`), through the command line.
Values that only one back end can hold (text or infinity in a SQLite NUMERIC,
NaN in a PostgreSQL NUMERIC) are written with raw SQL, as another system would.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import time_machine
from sqlalchemy import create_engine, exc, text
from support import CliResult, SourceData, export_rows, reject_reasons, run_cli
from support import run_sql as sql

LEGACY = "2025-11-02"


@pytest.fixture(autouse=True)
def frozen_clock() -> Iterator[None]:
    with time_machine.travel(datetime(2026, 6, 1, 3, 0, tzinfo=UTC), tick=False):
        yield


def run(db_url: str, *args: str) -> tuple[CliResult, dict[str, object]]:
    result = run_cli(db_url, *args)
    assert result.code == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]
    summaries = [e for e in events if e["event"] == "run.summary"]
    assert len(summaries) == 1
    return result, summaries[0]


def bad_rows_of_every_kind() -> SourceData:
    data = SourceData()
    data.project("p1", created=LEGACY).event("p1", "2026-05-03 10:00", "published", event_id="ev-pub")
    data.project("p2", created="2026-04-01 12:00").event("p2", "2026-05-01", "deleted", event_id="ev-del")
    # Events
    data.event("ghost", "2026-05-02", "archived", event_id="ev-ghost")
    data.event("p1", "2026-05-04", "restored", event_id="ev-restore-active")
    data.event("p2", "2026-05-05", "restored", event_id="ev-after-delete")
    data.event("p2", "2026-03-31", "archived", event_id="ev-before-creation")
    data.event("p1", "2026-05-06", "frozen", event_id="ev-unknown-kind")
    data.event("p1", "2026-05-07", "published", event_id="ev-published-twice")
    # Compute usage
    data.compute("ghost", "2026-05-03 10:00", "5", usage_id="cu-ghost")
    data.compute("p1", "2026-05-03 10:00", None, usage_id="cu-null")
    data.compute("p1", "2026-05-03 11:00", "2.5", usage_id="cu-good")
    # Cloud usage
    data.cloud("ghost", "2026-05-04", "page_views", "10", usage_id="cl-ghost")
    data.cloud("p1", "2026-05-04", "page_views", None, usage_id="cl-null")
    data.cloud("p1", "2026-05-04", "bandwidth_gb", "-1", usage_id="cl-negative")
    data.cloud("p1", "2026-05-04", "cpu_hours", "3", usage_id="cl-metric")
    data.cloud("p1", "2026-05-02", "domains", "1", usage_id="cl-unpublished")
    data.cloud("p1", "2026-05-04", "domains", "1", usage_id="cl-good")
    return data


EXPECTED = {
    ("project_events", "ev-ghost", "unknown_project"),
    ("project_events", "ev-restore-active", "event_not_allowed"),
    ("project_events", "ev-after-delete", "event_after_deletion"),
    ("project_events", "ev-before-creation", "event_before_creation"),
    ("project_events", "ev-unknown-kind", "unknown_event_kind"),
    ("project_events", "ev-published-twice", "event_not_allowed"),
    ("compute_usage", "cu-ghost", "unknown_project"),
    ("compute_usage", "cu-null", "missing_amount"),
    ("cloud_usage", "cl-ghost", "unknown_project"),
    ("cloud_usage", "cl-null", "missing_amount"),
    ("cloud_usage", "cl-negative", "negative_quantity"),
    ("cloud_usage", "cl-metric", "unknown_metric"),
    ("cloud_usage", "cl-unpublished", "not_published_that_day"),
}


def test_bad_rows_of_every_kind_are_recorded_with_their_reason_and_counted(db_url: str):
    bad_rows_of_every_kind().write_url(db_url)
    result, summary = run(db_url, "month-end", "--month", "2026-05")
    assert reject_reasons(db_url) == EXPECTED
    assert summary["rejects"] == len(EXPECTED)
    assert f"rejects={len(EXPECTED)}" in result.stdout
    lines = {(r["project_id"], r["line_type"]): r["amount"] for r in export_rows(db_url, "2026-05")}
    assert lines == {("p1", "storage_fee"): "29", ("p1", "cloud_domains"): "0.1"}


def test_nightly_records_the_bad_rows_of_the_days_it_bills(db_url: str):
    bad_rows_of_every_kind().write_url(db_url)
    _, summary = run(db_url, "nightly", "--date", "2026-05-04")
    on_that_day = {
        ("cloud_usage", "cl-ghost", "unknown_project"),
        ("cloud_usage", "cl-null", "missing_amount"),
        ("cloud_usage", "cl-negative", "negative_quantity"),
        ("cloud_usage", "cl-metric", "unknown_metric"),
    }
    events = {row for row in EXPECTED if row[0] == "project_events"}
    found = reject_reasons(db_url)
    assert on_that_day | events <= found
    assert summary["rejects"] == len(found)
    # Re-running records nothing twice.
    run(db_url, "nightly", "--date", "2026-05-04")
    assert reject_reasons(db_url) == found


def test_cloud_usage_before_the_effective_date_is_rejected(db_url: str):
    data = SourceData().project("p1", created=LEGACY).event("p1", "2026-03-01", "published")
    data.cloud("p1", "2026-03-23", "page_views", "10", usage_id="cl-early")
    data.cloud("p1", "2026-03-24", "page_views", "10", usage_id="cl-first-day")
    data.write_url(db_url)
    run(db_url, "month-end", "--month", "2026-03")
    assert reject_reasons(db_url) == {("cloud_usage", "cl-early", "before_effective_date")}
    assert [(r["line_type"], r["amount"]) for r in export_rows(db_url, "2026-03")] == [
        ("cloud_page_views", "0.01")
    ]


def backend(db_url: str) -> str:
    return db_url.split(":", 1)[0].split("+", 1)[0]


def test_values_a_numeric_column_should_not_hold_are_rejected_not_a_crash(db_url: str):
    data = SourceData().project("p1", created=LEGACY).event("p1", "2026-05-01", "published")
    data.compute("p1", "2026-05-02 10:00", "30", usage_id="cu-good")
    data.write_url(db_url)
    compute = "INSERT INTO compute_usage VALUES ('{id}', 'p1', '2026-05-03 10:00:00', {value})"
    cloud = "INSERT INTO cloud_usage VALUES ('{id}', 'p1', '2026-05-03', 'domains', {value})"
    if backend(db_url) == "sqlite":
        values = {"text": ("'abc'", "non_numeric_amount"), "inf": ("9e999", "non_finite_amount")}
        values["minus-inf"] = ("-9e999", "non_finite_amount")
        values["blob"] = ("x'00'", "non_numeric_amount")
    else:
        values = {"nan": ("'NaN'", "non_finite_amount")}
    for name, (value, _) in values.items():
        sql(db_url, compute.format(id=f"cu-{name}", value=value), cloud.format(id=f"cl-{name}", value=value))

    result, summary = run(db_url, "month-end", "--month", "2026-05")

    expected = {("compute_usage", f"cu-{n}", reason) for n, (_, reason) in values.items()}
    expected |= {("cloud_usage", f"cl-{n}", reason) for n, (_, reason) in values.items()}
    assert reject_reasons(db_url) == expected
    assert summary["rejects"] == len(expected)
    # The good compute row still reaches the threshold; the bad ones add nothing.
    assert [(r["line_type"], r["amount"]) for r in export_rows(db_url, "2026-05")] == [
        ("storage_fee", "29"),
        ("storage_refund", "-29"),
    ]
    assert "failed" not in result.stderr


def test_postgresql_numeric_cannot_hold_infinity_so_only_nan_reaches_the_jobs(pg_db_url: str):
    SourceData().project("p1", created=LEGACY).write_url(pg_db_url)
    for statement in (
        "INSERT INTO compute_usage VALUES ('cu-inf', 'p1', '2026-05-03 10:00:00', 'Infinity')",
        "INSERT INTO cloud_usage VALUES ('cl-inf', 'p1', '2026-05-03', 'domains', '-Infinity')",
    ):
        with pytest.raises(exc.DataError, match="numeric field overflow"):
            sql(pg_db_url, statement)


def test_300_compute_rows_of_a_tenth_reach_the_threshold_as_stored_by_each_back_end(db_url: str):
    SourceData().project("p1", created=LEGACY).write_url(db_url)
    rows = ", ".join(f"('cu-{i:03d}', 'p1', '2026-05-{1 + i % 28:02d} 12:00:00', 0.1)" for i in range(300))
    sql(db_url, f"INSERT INTO compute_usage VALUES {rows}")
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            if backend(db_url) == "sqlite":
                kinds = conn.execute(text("SELECT DISTINCT typeof(credits) FROM compute_usage")).all()
                assert [k for (k,) in kinds] == ["real"]  # a binary float, as SQLite stores NUMERIC
            else:
                kinds = conn.execute(
                    text("SELECT DISTINCT pg_typeof(credits)::text FROM compute_usage")
                ).all()
                assert [k for (k,) in kinds] == ["numeric"]
    finally:
        engine.dispose()
    run(db_url, "month-end", "--month", "2026-05")
    assert [(r["line_type"], r["amount"]) for r in export_rows(db_url, "2026-05")] == [
        ("storage_fee", "29"),
        ("storage_refund", "-29"),
    ]
