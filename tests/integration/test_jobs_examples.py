"""The worked examples of spec/examples.md end to end: source tables -> month-end -> export.

Every test runs on SQLite and PostgreSQL (`db_url`), through the command line
(`run_cli`), under a frozen clock so that every month of the examples has ended.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import time_machine
from sqlalchemy import create_engine, func, select
from support import SourceData, export_rows, export_text, run_cli

from billing_jobs.db.billing_tables import billing_metadata, billing_runs, invoices, rejects

NOW = datetime(2027, 6, 1, 12, 0, tzinfo=UTC)
LEGACY = "2025-11-02"
COLUMNS = (
    "invoice_kind",
    "account_id",
    "project_id",
    "period",
    "line_type",
    "quantity",
    "unit_price",
    "amount",
)


@pytest.fixture(autouse=True)
def frozen_clock() -> Iterator[None]:
    with time_machine.travel(NOW, tick=False):
        yield


def lines(rows: list[dict[str, str]]) -> list[tuple[str, ...]]:
    return [tuple(r[c] for c in COLUMNS) for r in rows]


def close(db_url: str, month: str, *config: str) -> None:
    result = run_cli(db_url, *config, "month-end", "--month", month)
    assert result.code == 0, result.stderr


def legacy(data: SourceData, p: str) -> SourceData:
    return data.project(p, created=LEGACY, account=p)


def published_legacy(data: SourceData, p: str) -> SourceData:
    return legacy(data, p).event(p, "2026-05-03 10:00", "published")


def created(when: str) -> Callable[[SourceData, str], SourceData]:
    return lambda data, p: data.project(p, created=when, account=p)


def storage(days: str) -> tuple[str, str, str, str]:
    return ("storage_fee", days, "1", days)


REFUND_29 = ("storage_refund", "1", "", "-29")

# Examples 1-15 (12 needs another timezone: see its own test). Each example gets
# its own account and project, named after it, in one database per back end.
Build = Callable[[SourceData, str], SourceData]
EXAMPLES: list[tuple[str, str, Build, list[tuple[str, str, str, str]]]] = [
    ("ex01", "2026-03", legacy, []),
    ("ex02", "2026-04", legacy, [storage("7")]),
    ("ex03", "2026-05", legacy, [storage("29")]),
    ("ex04", "2027-02", legacy, [storage("28")]),
    ("ex05", "2026-05", created("2026-05-10 14:00"), []),
    ("ex06", "2026-06", created("2026-05-10 14:00"), [storage("21")]),
    ("ex07", "2027-02", created("2027-01-31 09:00"), [storage("1")]),
    (
        "ex08",
        "2026-05",
        lambda d, p: (
            legacy(d, p).event(p, "2026-05-10 09:00", "archived").event(p, "2026-05-20 00:00", "restored")
        ),
        [storage("22")],
    ),
    (
        "ex09",
        "2026-06",
        lambda d, p: legacy(d, p).event(p, "2026-06-15 00:00:00", "deleted"),
        [storage("14")],
    ),
    (
        "ex10",
        "2026-05",
        lambda d, p: legacy(d, p).compute(p, "2026-05-03 10:00", "0.1", count=300),
        [storage("29"), REFUND_29],
    ),
    (
        "ex11",
        "2026-05",
        lambda d, p: (
            legacy(d, p)
            .compute(p, "2026-05-03 10:00", "0.1", count=299)
            .compute(p, "2026-05-31 23:59:59", "0.0999")
        ),
        [storage("29")],
    ),
    ("ex13", "2026-06", created("2026-05-31 17:00"), [storage("1")]),
    (
        "ex14",
        "2026-05",
        lambda d, p: (
            published_legacy(d, p)
            .cloud(p, "2026-05-03", "page_views", "12345")
            .cloud(p, "2026-05-04", "bandwidth_gb", "1.2345")
        ),
        [
            storage("29"),
            ("cloud_page_views", "12345", "0.001", "12.345"),
            ("cloud_bandwidth", "1.2345", "0.5", "0.6173"),
        ],
    ),
    (
        "ex15",
        "2026-05",
        lambda d, p: published_legacy(d, p).cloud(p, "2026-05-02", "page_views", "100", usage_id="cl-ex15"),
        [storage("29")],
    ),
]
MONTHS = sorted({month for _, month, _, _ in EXAMPLES})


def reject_rows(db_url: str) -> list[tuple[str, str, str, str | None, str]]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            r = rejects.c
            return [
                tuple(row)
                for row in conn.execute(
                    select(r.source_table, r.source_id, r.reason, r.project_id, r.period).order_by(
                        r.source_table, r.source_id, r.reason
                    )
                )
            ]
    finally:
        engine.dispose()


def test_worked_examples_through_month_end_and_export(db_url: str):
    """Examples 1-15 except 12 (another timezone), each in its own account, in one database."""
    data = SourceData()
    for p, _, build, _ in EXAMPLES:
        build(data, p)
    data.write_url(db_url)
    for month in MONTHS:
        close(db_url, month)
    exports = {month: export_rows(db_url, month) for month in MONTHS}

    got = {}
    for p, month, _, _ in EXAMPLES:
        rows = [r for r in exports[month] if r["account_id"] == p]
        assert len({r["invoice_id"] for r in rows}) <= 1
        assert {(r["invoice_kind"], r["project_id"], r["period"]) for r in rows} <= {("regular", p, month)}
        got[p] = [(r["line_type"], r["quantity"], r["unit_price"], r["amount"]) for r in rows]
    assert got == {p: expected for p, _, _, expected in EXAMPLES}
    # Example 15: the usage row of the day before publishing is a recorded reject.
    assert ("cloud_usage", "cl-ex15", "not_published_that_day", "ex15", "2026-05") in reject_rows(db_url)


def test_example_12_a_project_created_on_06_01_in_shanghai_is_free_all_june(db_url: str, tmp_path: Path):
    SourceData().project("p1", created="2026-05-31 17:00").write_url(db_url)
    config = tmp_path / "billing.toml"
    config.write_text('[billing]\ntimezone = "Asia/Shanghai"\n')
    close(db_url, "2026-06", "--config", str(config))
    assert export_rows(db_url, "2026-06") == []
    close(db_url, "2026-07", "--config", str(config))
    assert [(r["line_type"], r["quantity"], r["amount"]) for r in export_rows(db_url, "2026-07")] == [
        ("storage_fee", "29", "29")
    ]


def test_example_16_usage_of_an_unknown_project_is_rejected_and_the_run_exits_0(db_url: str):
    data = SourceData().project("p1", created=LEGACY)
    data.compute("ghost", "2026-05-03 10:00", "5", usage_id="cu-ghost").write_url(db_url)
    result = run_cli(db_url, "month-end", "--month", "2026-05")
    assert result.code == 0, result.stderr
    assert "rejects=1" in result.stdout
    assert reject_rows(db_url) == [("compute_usage", "cu-ghost", "unknown_project", "ghost", "2026-05")]
    assert lines(export_rows(db_url, "2026-05")) == [("regular", "acct-1", "p1", "2026-05", *storage("29"))]


def test_example_17_late_compute_after_close_writes_only_an_adjustment_invoice(db_url: str):
    data = SourceData().project("p1", created=LEGACY).project("p2", created=LEGACY)
    data.compute("p1", "2026-05-03 10:00", "29.5").compute("p2", "2026-05-04 10:00", "1")
    data.write_url(db_url)
    close(db_url, "2026-05")
    before = export_text(db_url, "2026-05")
    assert lines(export_rows(db_url, "2026-05")) == [
        ("regular", "acct-1", "p1", "2026-05", *storage("29")),
        ("regular", "acct-1", "p2", "2026-05", *storage("29")),
    ]

    SourceData().compute("p1", "2026-05-31 23:00", "1").write_url(db_url)
    close(db_url, "2026-05")

    after = export_text(db_url, "2026-05")
    regular_before = [line for line in before.splitlines()[1:] if ",regular," in line]
    regular_after = [line for line in after.splitlines()[1:] if ",regular," in line]
    assert regular_after == regular_before
    adjustments = [r for r in export_rows(db_url, "2026-05") if r["invoice_kind"] == "adjustment"]
    assert [(r["project_id"], r["line_type"], r["quantity"], r["amount"]) for r in adjustments] == [
        ("p1", "storage_refund", "1", "-29")
    ]
    assert len({r["invoice_id"] for r in adjustments}) == 1
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            kinds = conn.execute(
                select(invoices.c.kind, func.count()).group_by(invoices.c.kind).order_by(invoices.c.kind)
            ).all()
    finally:
        engine.dispose()
    assert [tuple(k) for k in kinds] == [("adjustment", 1), ("regular", 1)]


def billing_tables_contents(db_url: str) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table the jobs own, except the run records."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            out = {}
            for table in billing_metadata.sorted_tables:
                if table.name == "billing_runs":
                    continue
                rows = conn.execute(select(table)).all()
                out[table.name] = sorted((tuple(r) for r in rows), key=repr)
            return out
    finally:
        engine.dispose()


def run_count(db_url: str) -> int:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(billing_runs)).scalar_one()
    finally:
        engine.dispose()


def test_example_18_a_second_month_end_writes_nothing_and_the_export_is_byte_identical(db_url: str):
    data = SourceData().project("p1", created=LEGACY).event("p1", "2026-05-03 10:00", "published")
    data.project("p2", created="2026-05-10 14:00", account="acct-2")
    data.compute("p1", "2026-05-03 10:00", "30").cloud("p1", "2026-05-04", "domains", "2")
    data.cloud("p1", "2026-05-01", "domains", "2").compute("ghost", "2026-05-05 00:00", "1")
    data.write_url(db_url)
    close(db_url, "2026-05")
    contents, export = billing_tables_contents(db_url), export_text(db_url, "2026-05")
    runs = run_count(db_url)
    assert all(contents[t] for t in ("invoice_lines", "rejects", "charge_periods", "month_closes"))

    with time_machine.travel(datetime(2027, 6, 2, 8, 0, tzinfo=UTC), tick=False):
        close(db_url, "2026-05")

    assert billing_tables_contents(db_url) == contents
    assert export_text(db_url, "2026-05") == export
    assert run_count(db_url) == runs + 1
