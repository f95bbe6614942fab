"""`billing-jobs explain`: support's day-by-day view agrees with the invoice.

Every row of spec/examples.md: the example's source data, month-end for its
month, then `explain --json`; the totals explain gives must equal the exported
invoice lines of that project (same days, same amounts), and both must equal
the example's expected lines.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import time_machine

from tests.support import SourceData, export_rows, run_cli

LEGACY = "2025-11-02"  # created before the effective date 2026-03-24
AFTER_ALL_EXAMPLES = datetime(2027, 3, 10, 12, tzinfo=UTC)

Lines = dict[str, tuple[str, str]]  # line_type -> (quantity, amount)


@dataclass(frozen=True)
class Example:
    number: int
    month: str
    build: Callable[[SourceData], Any]
    expected: Lines
    timezone: str = "UTC"


def _legacy(d: SourceData) -> SourceData:
    return d.project("p1", created=LEGACY)


def _published_with_usage(d: SourceData) -> SourceData:
    _legacy(d).event("p1", "2026-05-03 10:00", "published")
    d.cloud("p1", "2026-05-03", "page_views", "12345")
    return d.cloud("p1", "2026-05-04", "bandwidth_gb", "1.2345")


EXAMPLE_14_LINES: Lines = {
    "storage_fee": ("29", "29"),
    "cloud_page_views": ("12345", "12.345"),
    "cloud_bandwidth": ("1.2345", "0.6173"),
}

EXAMPLES = [
    Example(1, "2026-03", _legacy, {}),
    Example(2, "2026-04", _legacy, {"storage_fee": ("7", "7")}),
    Example(3, "2026-05", _legacy, {"storage_fee": ("29", "29")}),
    Example(4, "2027-02", _legacy, {"storage_fee": ("28", "28")}),
    Example(5, "2026-05", lambda d: d.project("p1", created="2026-05-10 14:00"), {}),
    Example(
        6, "2026-06", lambda d: d.project("p1", created="2026-05-10 14:00"), {"storage_fee": ("21", "21")}
    ),
    Example(7, "2027-02", lambda d: d.project("p1", created="2027-01-31 09:00"), {"storage_fee": ("1", "1")}),
    Example(
        8,
        "2026-05",
        lambda d: (
            _legacy(d).event("p1", "2026-05-10 09:00", "archived").event("p1", "2026-05-20 00:00", "restored")
        ),
        {"storage_fee": ("22", "22")},
    ),
    Example(
        9,
        "2026-06",
        lambda d: _legacy(d).event("p1", "2026-06-15 00:00:00", "deleted"),
        {"storage_fee": ("14", "14")},
    ),
    Example(
        10,
        "2026-05",
        lambda d: _legacy(d).compute("p1", "2026-05-03 10:00", "0.1", count=300),
        {"storage_fee": ("29", "29"), "storage_refund": ("1", "-29")},
    ),
    Example(
        11,
        "2026-05",
        lambda d: (
            _legacy(d)
            .compute("p1", "2026-05-03 10:00", "0.1", count=299)
            .compute("p1", "2026-05-04", "0.0999")
        ),
        {"storage_fee": ("29", "29")},
    ),
    Example(
        12, "2026-06", lambda d: d.project("p1", created="2026-05-31 17:00"), {}, timezone="Asia/Shanghai"
    ),
    Example(
        13, "2026-06", lambda d: d.project("p1", created="2026-05-31 17:00"), {"storage_fee": ("1", "1")}
    ),
    Example(14, "2026-05", _published_with_usage, EXAMPLE_14_LINES),
    Example(
        15,
        "2026-05",
        lambda d: _published_with_usage(d).cloud(
            "p1", "2026-05-02", "page_views", "100", usage_id="cl-early"
        ),
        EXAMPLE_14_LINES,
    ),
    Example(
        16,
        "2026-05",
        lambda d: _legacy(d).compute("no-such-project", "2026-05-07 08:00", "5", usage_id="cu-ghost"),
        {"storage_fee": ("29", "29")},
    ),
]


def _config(tmp_path: Path, timezone: str) -> list[str]:
    if timezone == "UTC":
        return []
    path = tmp_path / "billing.toml"
    path.write_text(f'[billing]\ntimezone = "{timezone}"\n', encoding="utf-8")
    return ["--config", str(path)]


def _exported(db_url: str, month: str, project: str) -> dict[str, tuple[Decimal, Decimal]]:
    """The project's exported lines summed per line type (regular + adjustments)."""
    out: dict[str, tuple[Decimal, Decimal]] = {}
    for r in export_rows(db_url, month):
        if r["project_id"] == project:
            q, a = out.get(r["line_type"], (Decimal(0), Decimal(0)))
            out[r["line_type"]] = (q + Decimal(r["quantity"]), a + Decimal(r["amount"]))
    return out


def _explain(db_url: str, month: str, project: str = "p1", config: list[str] | None = None) -> dict[str, Any]:
    result = run_cli(db_url, *(config or []), "explain", "--project", project, "--month", month, "--json")
    assert result.code == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def _totals(doc: dict[str, Any], key: str = "totals") -> dict[str, tuple[Decimal, Decimal]]:
    return {t["line_type"]: (Decimal(t["quantity"]), Decimal(t["amount"])) for t in doc[key]}


def _as_decimals(lines: Lines) -> dict[str, tuple[Decimal, Decimal]]:
    return {t: (Decimal(q), Decimal(a)) for t, (q, a) in lines.items()}


def _assert_days_add_up(doc: dict[str, Any]) -> None:
    """The charged days and their amounts are the storage_fee line; the refund is minus it."""
    totals = _totals(doc)
    charged = [d for d in doc["days"] if d["charged"]]
    fee_days, fee = totals.get("storage_fee", (Decimal(0), Decimal(0)))
    assert len(charged) == fee_days
    assert sum(Decimal(d["amount"]) for d in doc["days"]) == fee
    assert Decimal(doc["storage"]["amount"]) == fee
    refund = totals.get("storage_refund", (Decimal(0), Decimal(0)))[1]
    assert Decimal(doc["waiver"]["refund"]) == refund
    assert doc["waiver"]["refund_applies"] == (refund != 0)
    for metric_line in (t for t in totals if t.startswith("cloud_")):
        day_sum = sum(
            Decimal(c["amount"]) for d in doc["days"] for c in d["cloud"] if c["line_type"] == metric_line
        )
        assert day_sum == totals[metric_line][1]


@pytest.mark.parametrize("example", EXAMPLES, ids=[f"example-{e.number}" for e in EXAMPLES])
def test_explain_agrees_with_the_exported_invoice_lines(
    db_url: str, tmp_path: Path, example: Example
) -> None:
    data = SourceData()
    example.build(data)
    data.write_url(db_url)
    config = _config(tmp_path, example.timezone)
    with time_machine.travel(AFTER_ALL_EXAMPLES, tick=False):
        closed = run_cli(db_url, *config, "month-end", "--month", example.month)
        assert closed.code == 0, closed.stderr
        doc = _explain(db_url, example.month, config=config)
    exported = _exported(db_url, example.month, "p1")
    assert _totals(doc) == exported == _as_decimals(example.expected)
    assert _totals(doc, "invoiced_totals") == exported
    assert doc["matches_invoices"] is True
    assert doc["differences"] == []
    assert doc["closed"] is True
    assert doc["timezone"] == example.timezone
    assert len(doc["days"]) == {"02": 28, "04": 30, "06": 30}.get(example.month[-2:], 31)
    _assert_days_add_up(doc)


def _day(doc: dict[str, Any], date: str) -> dict[str, Any]:
    [day] = [d for d in doc["days"] if d["date"] == date]
    found: dict[str, Any] = day
    return found


def test_explain_names_the_archive_and_restore_behind_inactive_days(db_url: str) -> None:
    SourceData().project("p1", created=LEGACY).event("p1", "2026-05-10 09:00", "archived").event(
        "p1", "2026-05-20 00:00", "restored"
    ).write_url(db_url)
    with time_machine.travel(AFTER_ALL_EXAMPLES, tick=False):
        doc = _explain(db_url, "2026-05")
        text = run_cli(db_url, "explain", "--project", "p1", "--month", "2026-05").stdout
    archived_day = _day(doc, "2026-05-10")
    assert archived_day["active"] is True  # active until 09:00: a positive overlap
    assert archived_day["why"] == "archived 09:00"
    assert archived_day["state"] == "archived"
    assert [e["kind"] for e in archived_day["events"]] == ["archived"]
    middle = _day(doc, "2026-05-15")
    assert middle["active"] is False
    assert middle["why"] == "archived since 2026-05-10 09:00"
    assert middle["storage"] is None
    restored = _day(doc, "2026-05-20")
    assert restored["active"] is True
    assert restored["why"] == "restored 00:00"
    assert restored["charged"] is True
    assert _day(doc, "2026-05-19")["active"] is False
    assert "archived since 2026-05-10 09:00" in text
    assert "restored 00:00" in text
    assert "note: month 2026-05 is not closed: no invoice yet" in text


def test_explain_shows_free_promotions_the_cap_and_rejected_events(db_url: str) -> None:
    data = SourceData().project("p1", created=LEGACY).project("p2", created="2026-05-10 14:00")
    data.event("p1", "2026-05-12 08:00", "restored", event_id="evt-bad")  # restored while active
    data.write_url(db_url)
    with time_machine.travel(AFTER_ALL_EXAMPLES, tick=False):
        legacy_march = _explain(db_url, "2026-03")
        legacy_may = _explain(db_url, "2026-05")
        new_may = _explain(db_url, "2026-05", project="p2")
    assert _day(legacy_march, "2026-03-23")["free"] == "before_effective_date"
    assert _day(legacy_march, "2026-03-24")["free"] == "free_legacy_month"
    assert _day(legacy_may, "2026-05-29")["charged"] is True
    assert _day(legacy_may, "2026-05-30")["cap_reached"] is True
    assert _day(legacy_may, "2026-05-30")["amount"] == "0"
    bad_day = _day(legacy_may, "2026-05-12")
    assert bad_day["why"] == "active; restored 08:00 rejected (event_not_allowed)"
    assert bad_day["events"][0]["accepted"] is False
    assert _day(new_may, "2026-05-09")["why"] == "not created yet"
    assert _day(new_may, "2026-05-10")["why"] == "created 14:00"
    assert _day(new_may, "2026-05-10")["free"] == "free_first_month"


def test_explain_shows_published_days_cloud_fees_and_rejected_usage(db_url: str) -> None:
    data = _published_with_usage(SourceData())
    data.cloud("p1", "2026-05-02", "page_views", "100", usage_id="cl-early")
    data.write_url(db_url)
    with time_machine.travel(AFTER_ALL_EXAMPLES, tick=False):
        doc = _explain(db_url, "2026-05")
    assert _day(doc, "2026-05-02")["published"] is False
    assert _day(doc, "2026-05-03")["published"] is True
    assert _day(doc, "2026-05-03")["why"] == "active; published 10:00"
    assert _day(doc, "2026-05-04")["cloud"] == [
        {"metric": "bandwidth_gb", "line_type": "cloud_bandwidth", "quantity": "1.2345", "amount": "0.6173"}
    ]
    assert [(r["source_id"], r["reason"]) for r in doc["rejected_rows"]] == [
        ("cl-early", "not_published_that_day")
    ]


def test_explain_shows_the_waiver_against_its_threshold(db_url: str) -> None:
    SourceData().project("p1", created=LEGACY).compute("p1", "2026-05-03 10:00", "0.1", count=299).compute(
        "p1", "2026-05-04", "0.0999"
    ).write_url(db_url)
    with time_machine.travel(AFTER_ALL_EXAMPLES, tick=False):
        doc = _explain(db_url, "2026-05")
    assert doc["waiver"]["compute_total"] == "29.9999"
    assert doc["waiver"]["threshold"] == "30"
    assert doc["waiver"]["threshold_reached"] is False
    assert doc["waiver"]["why"] == "compute 29.9999 < threshold 30: no refund"


def test_late_data_after_close_shows_as_a_difference_until_the_adjustment(db_url: str) -> None:
    """Example 17: the regular invoice stays; the adjustment brings the sum to the truth."""
    data = SourceData().project("p1", created=LEGACY)
    data.compute("p1", "2026-05-03 10:00", "29.5")
    data.write_url(db_url)
    with time_machine.travel(AFTER_ALL_EXAMPLES, tick=False):
        assert run_cli(db_url, "month-end", "--month", "2026-05").code == 0
        SourceData().compute("p1", "2026-05-31 10:00", "1").write_url(db_url)
        late = _explain(db_url, "2026-05")
        text = run_cli(db_url, "explain", "--project", "p1", "--month", "2026-05").stdout
        assert run_cli(db_url, "month-end", "--month", "2026-05").code == 0
        adjusted = _explain(db_url, "2026-05")
    assert late["matches_invoices"] is False
    assert late["differences"] == [{"line_type": "storage_refund", "quantity": "1", "amount": "-29"}]
    assert any("adjustment invoice" in note for note in late["notes"])
    assert "the invoices differ from the recomputation (storage_refund -29" in text

    exported = _exported(db_url, "2026-05", "p1")
    assert (
        _totals(adjusted)
        == exported
        == _as_decimals({"storage_fee": ("29", "29"), "storage_refund": ("1", "-29")})
    )
    assert adjusted["matches_invoices"] is True
    kinds = [(i["invoice_kind"], i["line_type"], i["amount"]) for i in adjusted["invoiced"]]
    assert kinds == [("regular", "storage_fee", "29"), ("adjustment", "storage_refund", "-29")]


def test_explain_still_agrees_after_month_end_runs_twice(db_url: str) -> None:
    """Example 18: the second run writes nothing; explain and export are unchanged."""
    _published_with_usage(SourceData()).write_url(db_url)
    with time_machine.travel(AFTER_ALL_EXAMPLES, tick=False):
        assert run_cli(db_url, "month-end", "--month", "2026-05").code == 0
        first = _explain(db_url, "2026-05")
        assert run_cli(db_url, "month-end", "--month", "2026-05").code == 0
        second = _explain(db_url, "2026-05")
    assert first == second
    assert _totals(second) == _exported(db_url, "2026-05", "p1") == _as_decimals(EXAMPLE_14_LINES)
    assert [i["invoice_kind"] for i in second["invoiced"]] == ["regular"] * 3


def test_an_unknown_project_is_one_line_and_exit_2(db_url: str) -> None:
    SourceData().project("p1", created=LEGACY).write_url(db_url)
    result = run_cli(db_url, "explain", "--project", "nope", "--month", "2026-05")
    assert result.code == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == ["billing-jobs: error: unknown project 'nope'"]


@pytest.mark.parametrize("month", ["2026-13", "2026-5", "May", ""])
def test_a_bad_month_is_exit_2(month: str) -> None:
    result = run_cli(None, "explain", "--project", "p1", "--month", month)
    assert result.code == 2
    assert "month" in result.stderr


def test_explain_has_help_text() -> None:
    result = run_cli(None, "explain", "--help")
    assert result.code == 0
    assert "Example" in result.stdout
