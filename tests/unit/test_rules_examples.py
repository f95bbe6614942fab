"""The worked examples of spec/examples.md, on the pure rules core (no database, no clock).

Each case is a few source rows in and the month's invoice lines out, computed by
the same chain of rules that the jobs use: lifecycle -> storage days -> charges ->
waiver -> cloud fees -> invoice lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from zoneinfo import ZoneInfo

import pandas as pd
import pytest

from billing_jobs.rules.calendar import Month, day_from_number, day_number
from billing_jobs.rules.cloud_fee import NOT_PUBLISHED, cloud_fees, published_days
from billing_jobs.rules.invoice import month_lines, unit_prices
from billing_jobs.rules.lifecycle import build_lifecycle
from billing_jobs.rules.money import format_units, to_units
from billing_jobs.rules.storage_fee import StorageRules, storage_charges, storage_days
from billing_jobs.rules.waiver import waiver_refunds
from billing_jobs.settings import Settings

LEGACY = "2025-11-02 00:00"


@dataclass
class Case:
    """Source data for one project (`p1`) and the month to bill."""

    month: str
    created: str = LEGACY
    events: list[tuple[str, str]] = field(default_factory=list)  # (occurred_at UTC, kind)
    compute: list[str] = field(default_factory=list)  # credits of valid rows in the month
    cloud: list[tuple[str, str, str]] = field(default_factory=list)  # (usage_date, metric, quantity)
    timezone: str = "UTC"


@dataclass
class Bill:
    lines: list[tuple[str, str, str]]  # (line_type, quantity, amount)
    cloud_rejects: list[tuple[str, str, str]]  # (usage_date, metric, reason)


def bill_month(case: Case, settings: Settings | None = None) -> Bill:
    """The rules core end to end for one project and one month."""
    settings = settings or Settings(timezone=case.timezone)
    zone = ZoneInfo(settings.timezone)
    month = Month.parse(case.month)
    rules = StorageRules.from_values(
        effective_from=settings.effective_from,
        credits_per_day=settings.credits_per_day,
        monthly_cap=settings.monthly_cap,
        new_project_free_months=settings.new_project_free_months,
        new_project_promo_until=settings.new_project_promo_until,
        legacy_free_months=settings.legacy_free_months,
    )
    projects = pd.DataFrame(
        {"project_id": ["p1"], "account_id": ["acct-1"], "created_at": pd.to_datetime([case.created])}
    )
    events = pd.DataFrame(
        {
            "event_id": pd.Series([f"e{i}" for i in range(len(case.events))], dtype=object),
            "project_id": pd.Series(["p1"] * len(case.events), dtype=object),
            "occurred_at": pd.to_datetime([when for when, _ in case.events]).astype("datetime64[us]"),
            "kind": pd.Series([kind for _, kind in case.events], dtype=object),
        }
    )
    lifecycle = build_lifecycle(projects, events)
    assert lifecycle.rejected.empty, lifecycle.rejected
    intervals = lifecycle.intervals
    active = intervals.loc[intervals["state"] == "active"]
    published = intervals.loc[intervals["state"] == "published"]

    days = storage_days(projects, active, month, zone, rules)
    charges = storage_charges(days)
    totals = charges.groupby("project_id", as_index=False)["amount_units"].sum()
    compute = pd.DataFrame({"project_id": ["p1"], "compute_units": [sum(to_units(c) for c in case.compute)]})
    threshold = settings.active_waiver_compute_threshold
    refunds = waiver_refunds(totals, compute, None if threshold is None else to_units(threshold))

    first, last = day_number(month.first_day), day_number(month.last_day)
    usage = pd.DataFrame(
        {
            "project_id": pd.Series(["p1"] * len(case.cloud), dtype=object),
            "day": pd.Series([day_number(date.fromisoformat(d)) for d, _, _ in case.cloud], dtype="int64"),
            "metric": pd.Series([m for _, m, _ in case.cloud], dtype=object),
            "quantity_units": pd.Series([to_units(q) for _, _, q in case.cloud], dtype="int64"),
        }
    )
    fees, rejected = cloud_fees(
        usage, published_days(published, first, last, zone), rules.effective_day, settings.cloud_prices
    )
    accounts = pd.Series(["acct-1"], index=["p1"])
    lines = month_lines(
        charges, refunds, fees, accounts, unit_prices(settings.credits_per_day, settings.cloud_prices)
    )
    return Bill(
        lines=[
            (r.line_type, format_units(r.quantity_units), format_units(r.amount_units))
            for r in lines.itertuples(index=False)
        ],
        cloud_rejects=[
            (str(day_from_number(r.day)), r.metric, r.reason) for r in rejected.itertuples(index=False)
        ],
    )


PUBLISHED_IN_MAY = [("2026-05-03 10:00", "published")]

EXAMPLES = [
    pytest.param(Case("2026-03"), [], id="1-legacy-project-free-in-march"),
    pytest.param(Case("2026-04"), [("storage_fee", "7", "7")], id="2-legacy-first-charge-04-24"),
    pytest.param(Case("2026-05"), [("storage_fee", "29", "29")], id="3-monthly-cap-29"),
    pytest.param(Case("2027-02"), [("storage_fee", "28", "28")], id="4-february-28-days"),
    pytest.param(Case("2026-05", created="2026-05-10 14:00"), [], id="5-new-project-free-first-month"),
    pytest.param(
        Case("2026-06", created="2026-05-10 14:00"), [("storage_fee", "21", "21")], id="6-charged-from-06-10"
    ),
    pytest.param(
        Case("2027-02", created="2027-01-31 09:00"),
        [("storage_fee", "1", "1")],
        id="7-clamped-month-arithmetic",
    ),
    pytest.param(
        Case("2026-05", events=[("2026-05-10 09:00", "archived"), ("2026-05-20 00:00", "restored")]),
        [("storage_fee", "22", "22")],
        id="8-archived-and-restored",
    ),
    pytest.param(
        Case("2026-06", events=[("2026-06-15 00:00:00", "deleted")]),
        [("storage_fee", "14", "14")],
        id="9-deleted-at-midnight",
    ),
    pytest.param(
        Case("2026-05", compute=["0.1"] * 300),
        [("storage_fee", "29", "29"), ("storage_refund", "1", "-29")],
        id="10-waiver-threshold-reached-exactly",
    ),
    pytest.param(
        Case("2026-05", compute=["0.1"] * 299 + ["0.0999"]),
        [("storage_fee", "29", "29")],
        id="11-waiver-threshold-missed-by-0.0001",
    ),
    pytest.param(
        Case("2026-06", created="2026-05-31 17:00", timezone="Asia/Shanghai"),
        [],
        id="12-created-06-01-in-shanghai",
    ),
    pytest.param(
        Case("2026-06", created="2026-05-31 17:00", timezone="UTC"),
        [("storage_fee", "1", "1")],
        id="13-same-data-in-utc",
    ),
    pytest.param(
        Case(
            "2026-05",
            events=PUBLISHED_IN_MAY,
            cloud=[("2026-05-03", "page_views", "12345"), ("2026-05-04", "bandwidth_gb", "1.2345")],
        ),
        [
            ("storage_fee", "29", "29"),
            ("cloud_page_views", "12345", "12.345"),
            ("cloud_bandwidth", "1.2345", "0.6173"),
        ],
        id="14-cloud-fees-rounded-half-up",
    ),
    pytest.param(
        Case("2026-05", events=PUBLISHED_IN_MAY, cloud=[("2026-05-02", "page_views", "100")]),
        [("storage_fee", "29", "29")],
        id="15-usage-before-publishing-is-not-charged",
    ),
]


@pytest.mark.parametrize(("case", "expected"), EXAMPLES)
def test_worked_example_gives_the_expected_invoice_lines(case: Case, expected: list[tuple[str, str, str]]):
    assert bill_month(case).lines == expected


def test_example_15_usage_on_a_day_before_publishing_is_rejected_as_not_published():
    case = Case("2026-05", events=PUBLISHED_IN_MAY, cloud=[("2026-05-02", "page_views", "100")])
    assert bill_month(case).cloud_rejects == [("2026-05-02", "page_views", NOT_PUBLISHED)]


def test_example_14_usage_on_the_day_of_publishing_counts():
    case = Case("2026-05", events=PUBLISHED_IN_MAY, cloud=[("2026-05-03", "page_views", "1")])
    bill = bill_month(case)
    assert ("cloud_page_views", "1", "0.001") in bill.lines
    assert bill.cloud_rejects == []


def test_threshold_of_300_rows_of_a_tenth_is_exactly_30_credits():
    assert sum(to_units("0.1") for _ in range(300)) == to_units("30")
    assert sum(to_units(c) for c in ["0.1"] * 299 + ["0.0999"]) == to_units("29.9999")


def test_reversals_count_towards_the_waiver_threshold():
    case = Case("2026-05", compute=["31", "-1.0001"])
    assert bill_month(case).lines == [("storage_fee", "29", "29")]
    case = Case("2026-05", compute=["31", "-1"])
    assert bill_month(case).lines == [("storage_fee", "29", "29"), ("storage_refund", "1", "-29")]


def test_a_month_without_storage_fee_gets_no_refund_line_whatever_the_compute():
    assert bill_month(Case("2026-05", created="2026-05-10 14:00", compute=["100"])).lines == []


def test_an_empty_waiver_threshold_turns_the_waiver_off():
    settings = Settings(active_waiver_compute_threshold=None)
    assert bill_month(Case("2026-05", compute=["1000"]), settings).lines == [("storage_fee", "29", "29")]


def test_no_cap_or_waiver_applies_to_cloud_fees():
    case = Case(
        "2026-05",
        events=PUBLISHED_IN_MAY,
        compute=["30"],
        cloud=[("2026-05-10", "bandwidth_gb", "100"), ("2026-05-11", "domains", "3")],
    )
    assert bill_month(case).lines == [
        ("storage_fee", "29", "29"),
        ("storage_refund", "1", "-29"),
        ("cloud_bandwidth", "100", "50"),
        ("cloud_domains", "3", "0.3"),
    ]


def test_cloud_usage_before_the_effective_date_is_rejected():
    case = Case(
        "2026-03",
        events=[("2026-03-01 00:00", "published")],
        cloud=[("2026-03-23", "page_views", "10"), ("2026-03-24", "page_views", "10")],
    )
    bill = bill_month(case)
    assert bill.lines == [("cloud_page_views", "10", "0.01")]
    assert bill.cloud_rejects == [("2026-03-23", "page_views", "before_effective_date")]


def test_settings_change_the_rates_of_a_worked_example():
    settings = Settings(credits_per_day=Decimal("2"), monthly_cap=Decimal("45"))
    assert bill_month(Case("2026-04"), settings).lines == [("storage_fee", "7", "14")]
    assert bill_month(Case("2026-05"), settings).lines == [("storage_fee", "23", "45")]
