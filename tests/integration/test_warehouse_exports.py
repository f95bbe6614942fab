"""Warehouse exports, through the command line on both back ends: the invoice lines,
the invoice headers and the credits ledger as Parquet hold exactly what their CSV
holds, with typed columns (docs/exports.md): amounts as decimals (compared as
`Decimal`), days as dates, times as UTC timestamps, an empty CSV field as a null."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import time_machine
from hypothesis import given
from hypothesis import strategies as st
from support import SourceData, ok, run_cli

from billing_jobs.jobs.warehouse import decimal_array

NOW = datetime(2026, 7, 15, 12, 0, tzinfo=UTC)
MONTH = "2026-05"
UNITS = pa.decimal128(19, 4)
CENTS = pa.decimal128(19, 2)
AT = pa.timestamp("ms", tz="UTC")

LINES = pa.schema(
    [
        ("invoice_id", pa.string()),
        ("invoice_kind", pa.string()),
        ("account_id", pa.string()),
        ("project_id", pa.string()),
        ("period", pa.string()),
        ("line_type", pa.string()),
        ("quantity", UNITS),
        ("unit_price", pa.string()),
        ("amount", UNITS),
        ("invoice_sequence", pa.int32()),
        ("invoice_number", pa.string()),
        ("finalized_at", AT),
    ]
)
HEADERS = pa.schema(
    [
        ("invoice_id", pa.string()),
        ("invoice_number", pa.string()),
        ("invoice_kind", pa.string()),
        ("account_id", pa.string()),
        ("period", pa.string()),
        ("status", pa.string()),
        ("total", UNITS),
        ("line_count", pa.int32()),
        ("invoice_sequence", pa.int32()),
        ("finalized_at", AT),
    ]
)
LEDGER = pa.schema(
    [
        ("entry_id", pa.string()),
        ("account_id", pa.string()),
        ("lot_id", pa.string()),
        ("kind", pa.string()),
        ("day", pa.date32()),
        ("period", pa.string()),
        ("corrects", pa.string()),
        ("credits", UNITS),
        ("money", CENTS),
    ]
)


@pytest.fixture(autouse=True)
def frozen_clock() -> Iterator[None]:
    with time_machine.travel(NOW, tick=False):
        yield


def closed_and_adjusted_month(db_url: str) -> None:
    """May 2026 with every kind of line and ledger entry: storage fees and a waiver
    refund (no unit price), cloud fees with fractional quantities, credits funded,
    drawn, in arrears and refunded; then re-closed with adjustments (negative amounts)."""
    data = SourceData()
    for acct in ("acct-a", "acct-b"):
        data.project(f"{acct}-legacy", created="2025-11-02", account=acct)
        data.project(f"{acct}-new", created="2026-05-03 10:00", account=acct)
        data.project(f"{acct}-site", created="2026-04-01", account=acct)
        data.event(f"{acct}-site", "2026-05-02 08:00", "published")
        for day in range(1, 29, 4):
            data.cloud(f"{acct}-site", f"2026-05-{day:02d}", "page_views", "12345.6789")
            data.cloud(f"{acct}-site", f"2026-05-{day:02d}", "bandwidth_gb", "0.3333")
    data.compute("acct-a-legacy", "2026-05-03 10:00", "0.1", count=320)  # active: waived
    data.compute("acct-b-new", "2026-05-04 11:00", "2.5")
    data.top_up("tu-1", "2026-05-02 09:00", account="acct-b", credits="1000", amount="95.00")
    data.refund_request("rr-1", "2026-05-25 09:00", account="acct-b")
    data.write_url(db_url)
    ok(db_url, "month-end", "--month", MONTH)
    late = SourceData()
    late.event("acct-b-legacy", "2026-05-20 00:00", "archived")
    late.cloud("acct-a-site", "2026-05-30", "page_views", "50000")
    late.write_url(db_url)
    ok(db_url, "month-end", "--month", MONTH)


def csv_rows(text: str) -> tuple[list[str], list[dict[str, str]]]:
    reader = csv.DictReader(io.StringIO(text))
    rows = list(reader)
    return list(reader.fieldnames or []), rows


def as_csv_value(value: Any) -> Any:
    """A Parquet value as the CSV has it: decimals stay decimals (compared by value)."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        assert value.tzinfo is not None
        assert value.utcoffset() == UTC.utcoffset(value)
        return value.strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return value
    return str(value)


def csv_typed(header: list[str], rows: list[dict[str, str]], schema: pa.Schema) -> list[list[Any]]:
    decimals = {f.name for f in schema if pa.types.is_decimal(f.type)}
    return [[Decimal(r[c]) if c in decimals and r[c] else r[c] for c in header] for r in rows]


def assert_same(csv_text: str, parquet: Path, schema: pa.Schema) -> int:
    header, rows = csv_rows(csv_text)
    table = pq.read_table(parquet)
    assert table.schema.remove_metadata() == schema
    assert header == table.schema.names
    got = [[as_csv_value(v) for v in row.values()] for row in table.to_pylist()]
    assert got == csv_typed(header, rows, schema)
    for name in (f.name for f in schema if pa.types.is_decimal(f.type)):
        # The same sums, exactly: no value went through a float.
        csv_sum = sum((Decimal(r[name]) for r in rows if r[name]), Decimal(0))
        parquet_sum = sum((v for v in table.column(name).to_pylist() if v is not None), Decimal(0))
        assert csv_sum == parquet_sum
    return len(rows)


def test_parquet_exports_hold_exactly_what_the_csv_exports_hold(db_url: str, tmp_path: Path) -> None:
    closed_and_adjusted_month(db_url)
    cases = [
        (("export", "--month", MONTH), LINES),
        (("export", "--month", MONTH, "--headers"), HEADERS),
        (("credits", "export", "--month", MONTH), LEDGER),
    ]
    counted = []
    for args, schema in cases:
        target = tmp_path / f"{args[0]}-{len(args)}.parquet"
        text = ok(db_url, *args)
        # The same CSV written to a file (and --format csv is the default).
        csv_file = tmp_path / f"{args[0]}-{len(args)}.csv"
        ok(db_url, *args, "--format", "csv", "--output", str(csv_file))
        assert csv_file.read_text("utf-8") == text
        ok(db_url, *args, "--format", "parquet", "--output", str(target))
        assert not target.with_name(target.name + ".partial").exists()
        counted.append(assert_same(text, target, schema))
    lines, heads, entries = counted
    assert lines > heads >= 4  # regular and adjustment invoices of both accounts
    assert entries > 0

    # What the data was chosen to contain: negative amounts, null prices, money, arrears.
    table = pq.read_table(tmp_path / f"export-{3}.parquet")
    amounts = table.column("amount").to_pylist()
    assert min(amounts) < 0 < max(amounts)
    assert None in table.column("unit_price").to_pylist()
    assert any(v is not None and v != v.to_integral() for v in table.column("quantity").to_pylist())
    ledger = pq.read_table(tmp_path / f"credits-{4}.parquet").to_pylist()
    assert {e["kind"] for e in ledger} >= {"fund", "draw", "refund"}
    assert all((e["money"] is None) == (e["kind"] not in ("fund", "refund")) for e in ledger)


def test_an_empty_month_exports_an_empty_typed_file(db_url: str, tmp_path: Path) -> None:
    SourceData().project("p1", created="2025-11-02").write_url(db_url)
    ok(db_url, "db", "upgrade")
    target = tmp_path / "empty.parquet"
    ok(db_url, "export", "--month", "2026-04", "--format", "parquet", "--output", str(target))
    table = pq.read_table(target)
    assert table.num_rows == 0
    assert table.schema.remove_metadata() == LINES


@pytest.mark.parametrize("command", [("export",), ("export", "--headers"), ("credits", "export")])
def test_parquet_without_an_output_file_is_a_usage_error(db_url: str, command: tuple[str, ...]) -> None:
    SourceData().project("p1", created="2025-11-02").write_url(db_url)
    ok(db_url, "db", "upgrade")
    result = run_cli(db_url, *command, "--month", MONTH, "--format", "parquet")
    assert result.code == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "billing-jobs: error: --format parquet writes a file: give --output FILE"
    ]


INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@given(st.lists(st.one_of(st.none(), INT64), max_size=40), st.sampled_from([2, 4]))
def test_decimals_are_built_from_the_integer_units_exactly(units: list[int | None], scale: int) -> None:
    arrow = pa.decimal128(19, scale)
    built = decimal_array(units, arrow)
    built.validate(full=True)
    assert built.to_pylist() == [None if u is None else Decimal(u).scaleb(-scale) for u in units]
