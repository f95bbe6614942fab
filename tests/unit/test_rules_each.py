"""Each rule of billing-rules.md in isolation: calendar, lifecycle, storage fee, money."""

from __future__ import annotations

from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pytest

from billing_jobs.rules.calendar import (
    Month,
    add_months,
    add_months_days,
    day_from_number,
    day_number,
)
from billing_jobs.rules.lifecycle import (
    AFTER_DELETION,
    BEFORE_CREATION,
    NOT_ALLOWED,
    OPEN_END,
    UNKNOWN_KIND,
    UNKNOWN_PROJECT,
    build_lifecycle,
)
from billing_jobs.rules.money import format_units, round_half_up_units, to_units
from billing_jobs.rules.storage_fee import (
    CHARGED,
    FREE_LEGACY,
    FREE_NEW,
    StorageRules,
    active_days,
    storage_charges,
    storage_days,
)

UTC = ZoneInfo("UTC")


def d(text: str) -> date:
    return date.fromisoformat(text)


# ---------------------------------------------------------------------------
# Calendar: clamped month arithmetic
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "months", "expected"),
    [
        ("2026-01-31", 1, "2026-02-28"),
        ("2026-05-10", 1, "2026-06-10"),
        ("2026-03-31", 2, "2026-05-31"),
        ("2026-03-31", 1, "2026-04-30"),
        ("2026-03-24", 1, "2026-04-24"),
        ("2026-12-15", 1, "2027-01-15"),
        ("2026-12-31", 2, "2027-02-28"),
        ("2028-01-31", 1, "2028-02-29"),
        ("2028-02-29", 1, "2028-03-29"),
        ("2028-02-29", 12, "2029-02-28"),
        ("2024-02-29", 48, "2028-02-29"),
        ("2100-01-31", 1, "2100-02-28"),
        ("2000-01-31", 1, "2000-02-29"),
        ("2026-05-10", 0, "2026-05-10"),
    ],
)
def test_adding_months_clamps_to_the_end_of_the_month(start: str, months: int, expected: str):
    assert add_months(d(start), months) == d(expected)
    vectorized = add_months_days(np.array([day_number(d(start))], dtype=np.int64), months)
    assert day_from_number(vectorized[0]) == d(expected)


def test_month_parse_rejects_malformed_months():
    for text in ("2026-13", "2026-0", "2026-5", "26-05", "2026/05", "May", "2026-05-01"):
        with pytest.raises(ValueError, match="YYYY-MM"):
            Month.parse(text)
    assert str(Month.parse("2026-05")) == "2026-05"
    assert Month.parse("2027-01").previous() == Month(2026, 12)
    assert Month.parse("2026-12").next() == Month(2027, 1)


# ---------------------------------------------------------------------------
# Lifecycle: half-open intervals and the event state machine
# ---------------------------------------------------------------------------


def projects_frame(*rows: tuple[str, str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "project_id": pd.Series([p for p, _ in rows], dtype=object),
            "account_id": pd.Series(["acct-1"] * len(rows), dtype=object),
            "created_at": pd.to_datetime([c for _, c in rows]).astype("datetime64[us]"),
        }
    )


def events_frame(*rows: tuple[str, str, str]) -> pd.DataFrame:
    """(project_id, occurred_at, kind) rows; event ids e0, e1, ... in the order given."""
    return pd.DataFrame(
        {
            "event_id": pd.Series([f"e{i}" for i in range(len(rows))], dtype=object),
            "project_id": pd.Series([p for p, _, _ in rows], dtype=object),
            "occurred_at": pd.to_datetime([t for _, t, _ in rows]).astype("datetime64[us]"),
            "kind": pd.Series([k for _, _, k in rows], dtype=object),
        }
    )


def outcome(projects: pd.DataFrame, events: pd.DataFrame) -> dict[str, str]:
    """event_id -> '' when accepted, else its reject reason."""
    lc = build_lifecycle(projects, events)
    accepted = dict(zip(lc.events["event_id"], lc.events["accepted"], strict=True))
    reason = dict(zip(lc.events["event_id"], lc.events["reason"], strict=True))
    for event_id, ok in accepted.items():
        assert ok == (reason[event_id] == "")
    return reason


def intervals_of(projects: pd.DataFrame, events: pd.DataFrame, state: str) -> list[tuple[str, str]]:
    iv = build_lifecycle(projects, events).intervals
    iv = iv.loc[iv["state"] == state].sort_values("start")
    return [
        (str(s), "open" if e == OPEN_END else str(e)) for s, e in zip(iv["start"], iv["end"], strict=True)
    ]


P1 = projects_frame(("p1", "2026-04-01 10:00"))


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        pytest.param([("p1", "2026-05-01", "restored")], [NOT_ALLOWED], id="restored-while-active"),
        pytest.param(
            [("p1", "2026-05-01", "archived"), ("p1", "2026-05-02", "archived")],
            ["", NOT_ALLOWED],
            id="archived-twice",
        ),
        pytest.param(
            [("p1", "2026-05-01", "deleted"), ("p1", "2026-05-02", "restored")],
            ["", AFTER_DELETION],
            id="restored-after-deleted",
        ),
        pytest.param(
            [("p1", "2026-05-01", "deleted"), ("p1", "2026-05-02", "published")],
            ["", AFTER_DELETION],
            id="published-after-deleted",
        ),
        pytest.param(
            [("p1", "2026-05-01", "deleted"), ("p1", "2026-05-02", "deleted")],
            ["", AFTER_DELETION],
            id="deleted-twice",
        ),
        pytest.param([("p1", "2026-04-01 09:59:59", "archived")], [BEFORE_CREATION], id="before-creation"),
        pytest.param([("p1", "2026-05-01", "frozen")], [UNKNOWN_KIND], id="unknown-kind"),
        pytest.param([("ghost", "2026-05-01", "archived")], [UNKNOWN_PROJECT], id="unknown-project"),
        pytest.param(
            [("p1", "2026-05-01", "published"), ("p1", "2026-05-02", "published")],
            ["", NOT_ALLOWED],
            id="published-twice",
        ),
        pytest.param(
            [("p1", "2026-05-01", "unpublished")], [NOT_ALLOWED], id="unpublished-while-unpublished"
        ),
        pytest.param(
            [("p1", "2026-05-01", "archived"), ("p1", "2026-05-02", "published")],
            ["", ""],
            id="published-while-archived-is-allowed",
        ),
        pytest.param(
            [("p1", "2026-05-01", "archived"), ("p1", "2026-05-02", "deleted")],
            ["", ""],
            id="deleted-while-archived-is-allowed",
        ),
        pytest.param([("p1", "2026-04-01 10:00", "archived")], [""], id="at-the-creation-instant-is-allowed"),
    ],
)
def test_the_event_state_machine_accepts_or_rejects_with_a_reason(
    events: list[tuple[str, str, str]], expected: list[str]
):
    reasons = outcome(P1, events_frame(*events))
    assert [reasons[f"e{i}"] for i in range(len(events))] == expected


def test_a_rejected_event_changes_nothing():
    events = events_frame(
        ("p1", "2026-05-01", "restored"),  # rejected: active
        ("p1", "2026-05-03", "archived"),
        ("p1", "2026-05-04", "archived"),  # rejected: already archived
        ("p1", "2026-05-05", "restored"),
    )
    assert intervals_of(P1, events, "active") == [
        ("2026-04-01 10:00:00", "2026-05-03 00:00:00"),
        ("2026-05-05 00:00:00", "open"),
    ]


def test_events_apply_in_occurred_at_then_event_id_order_whatever_the_input_order():
    events = events_frame(
        ("p1", "2026-05-05", "restored"),
        ("p1", "2026-05-03", "archived"),
    )
    assert outcome(P1, events) == {"e0": "", "e1": ""}
    same_instant = pd.DataFrame(
        {
            "event_id": ["b", "a"],
            "project_id": ["p1", "p1"],
            "occurred_at": pd.to_datetime(["2026-05-03", "2026-05-03"]).astype("datetime64[us]"),
            "kind": ["restored", "archived"],
        }
    )
    # `a` (archived) applies first, then `b` (restored) is allowed.
    assert outcome(P1, same_instant) == {"a": "", "b": ""}


def test_deletion_turns_the_published_flag_off():
    events = events_frame(
        ("p1", "2026-05-01 12:00", "published"),
        ("p1", "2026-05-10 12:00", "deleted"),
    )
    assert intervals_of(P1, events, "published") == [("2026-05-01 12:00:00", "2026-05-10 12:00:00")]
    assert intervals_of(P1, events, "active") == [("2026-04-01 10:00:00", "2026-05-10 12:00:00")]


def test_deleting_an_archived_project_does_not_reopen_or_close_activity_again():
    events = events_frame(
        ("p1", "2026-05-01", "archived"),
        ("p1", "2026-05-10", "deleted"),
    )
    assert intervals_of(P1, events, "active") == [("2026-04-01 10:00:00", "2026-05-01 00:00:00")]


def test_publishing_is_independent_of_archiving():
    events = events_frame(
        ("p1", "2026-05-01", "published"),
        ("p1", "2026-05-02", "archived"),
        ("p1", "2026-05-03", "unpublished"),
        ("p1", "2026-05-04", "published"),
    )
    assert intervals_of(P1, events, "published") == [
        ("2026-05-01 00:00:00", "2026-05-03 00:00:00"),
        ("2026-05-04 00:00:00", "open"),
    ]


def active_day_list(created: str, events: list[tuple[str, str]], first: str, last: str, tz: str = "UTC"):
    projects = projects_frame(("p1", created))
    ev = events_frame(*[("p1", t, k) for t, k in events])
    iv = build_lifecycle(projects, ev).intervals
    days = active_days(
        iv.loc[iv["state"] == "active"], day_number(d(first)), day_number(d(last)), ZoneInfo(tz)
    )
    return [str(day_from_number(n)) for n in sorted(days["day"])]


def test_a_project_archived_exactly_at_midnight_is_not_active_that_day():
    days = active_day_list("2026-05-01 08:00", [("2026-05-03 00:00", "archived")], "2026-05-01", "2026-05-05")
    assert days == ["2026-05-01", "2026-05-02"]


def test_a_project_archived_one_microsecond_after_midnight_is_active_that_day():
    days = active_day_list(
        "2026-05-01 08:00", [("2026-05-03 00:00:00.000001", "archived")], "2026-05-01", "2026-05-05"
    )
    assert days == ["2026-05-01", "2026-05-02", "2026-05-03"]


def test_a_project_created_at_23_59_is_active_that_day():
    assert active_day_list("2026-05-01 23:59", [], "2026-05-01", "2026-05-02") == ["2026-05-01", "2026-05-02"]


def test_a_project_archived_at_the_instant_of_creation_is_never_active():
    assert (
        active_day_list("2026-05-01 10:00", [("2026-05-01 10:00", "archived")], "2026-04-30", "2026-05-02")
        == []
    )


def test_midnight_is_local_midnight_in_the_billing_timezone():
    # 2026-05-02 16:00 UTC is 2026-05-03 00:00 in Shanghai (UTC+8).
    days = active_day_list(
        "2026-05-01 08:00", [("2026-05-02 16:00", "archived")], "2026-05-01", "2026-05-05", "Asia/Shanghai"
    )
    assert days == ["2026-05-01", "2026-05-02"]


def test_a_daylight_saving_day_is_one_billing_day():
    # America/New_York: 2026-11-01 is 25 hours long, 2026-03-08 is 23 hours long.
    days = active_day_list(
        "2026-11-01 04:30", [("2026-11-02 05:00", "archived")], "2026-10-30", "2026-11-05", "America/New_York"
    )
    assert days == ["2026-11-01"]
    days = active_day_list(
        "2026-03-08 05:00", [("2026-03-09 04:00", "archived")], "2026-03-06", "2026-03-10", "America/New_York"
    )
    assert days == ["2026-03-08"]


# ---------------------------------------------------------------------------
# Storage fee: free months, promotion end, legacy month, cap
# ---------------------------------------------------------------------------


def rules(**overrides: object) -> StorageRules:
    values: dict[str, object] = {
        "effective_from": d("2026-03-24"),
        "credits_per_day": Decimal("1"),
        "monthly_cap": Decimal("29"),
        "new_project_free_months": 1,
        "new_project_promo_until": None,
        "legacy_free_months": 1,
    }
    values.update(overrides)
    return StorageRules.from_values(**values)  # type: ignore[arg-type]


def month_days(created: str, month: str, r: StorageRules, tz: str = "UTC") -> pd.DataFrame:
    projects = projects_frame(("p1", created))
    iv = build_lifecycle(projects, events_frame()).intervals
    return storage_days(projects, iv.loc[iv["state"] == "active"], Month.parse(month), ZoneInfo(tz), r)


def charged(created: str, month: str, r: StorageRules) -> list[tuple[str, str]]:
    rows = storage_charges(month_days(created, month, r))
    return [
        (str(day_from_number(x)), format_units(a))
        for x, a in zip(rows["day"], rows["amount_units"], strict=True)
    ]


def test_nothing_is_charged_before_the_effective_date():
    days = month_days("2025-11-02", "2026-03", rules(legacy_free_months=0))
    assert charged("2025-11-02", "2026-03", rules(legacy_free_months=0))[0] == ("2026-03-24", "1")
    assert set(days.loc[days["day"] < day_number(d("2026-03-24")), "amount_units"]) == {0}


def test_a_new_project_gets_its_first_month_free():
    days = month_days("2026-05-10 14:00", "2026-06", rules())
    status = dict(zip((str(day_from_number(x)) for x in days["day"]), days["status"], strict=True))
    assert status["2026-06-09"] == FREE_NEW
    assert status["2026-06-10"] == CHARGED


def test_no_free_month_when_new_project_free_months_is_0():
    assert len(charged("2026-05-10 14:00", "2026-05", rules(new_project_free_months=0))) == 22
    assert charged("2026-05-10 14:00", "2026-05", rules(new_project_free_months=0))[0] == ("2026-05-10", "1")


def test_no_legacy_month_when_legacy_free_months_is_0():
    rows = charged("2025-11-02", "2026-03", rules(legacy_free_months=0))
    assert [day for day, _ in rows] == [f"2026-03-{n}" for n in range(24, 32)]


def test_the_legacy_month_covers_the_effective_date_to_04_23():
    days = month_days("2025-11-02", "2026-04", rules())
    free = days.loc[days["status"] == FREE_LEGACY, "day"]
    assert [str(day_from_number(x)) for x in (free.min(), free.max())] == ["2026-04-01", "2026-04-23"]
    assert charged("2025-11-02", "2026-04", rules())[0] == ("2026-04-24", "1")


def test_two_legacy_months_run_to_05_23():
    assert charged("2025-11-02", "2026-05", rules(legacy_free_months=2))[0] == ("2026-05-24", "1")


def test_a_project_created_on_the_promotion_end_date_gets_no_free_month():
    r = rules(new_project_promo_until=d("2026-06-01"))
    assert charged("2026-06-01 00:00", "2026-06", r)[0] == ("2026-06-01", "1")
    assert charged("2026-05-31 23:59", "2026-06", r)[0] == ("2026-06-30", "1")


def test_the_promotion_end_compares_local_creation_dates():
    # 2026-05-31 17:00 UTC is 2026-06-01 in Shanghai: on the end date, so no free month.
    r = rules(new_project_promo_until=d("2026-06-01"))
    days = month_days("2026-05-31 17:00", "2026-06", r, tz="Asia/Shanghai")
    assert int(days["amount_units"].sum()) == to_units("29")
    assert FREE_NEW not in set(days["status"])


def test_a_non_integer_rate_makes_the_last_charge_of_the_month_partial():
    r = rules(credits_per_day=Decimal("0.7"), monthly_cap=Decimal("2"))
    assert charged("2025-11-02", "2026-05", r) == [
        ("2026-05-01", "0.7"),
        ("2026-05-02", "0.7"),
        ("2026-05-03", "0.6"),
    ]


def test_a_rate_of_zero_charges_nothing():
    assert charged("2025-11-02", "2026-05", rules(credits_per_day=Decimal("0"))) == []


def test_a_cap_of_zero_charges_nothing():
    assert charged("2025-11-02", "2026-05", rules(monthly_cap=Decimal("0"))) == []


def test_each_month_stands_alone():
    assert len(charged("2025-11-02", "2026-05", rules())) == 29
    assert len(charged("2025-11-02", "2026-06", rules())) == 29
    assert len(charged("2025-11-02", "2026-02", rules())) == 0
    assert len(charged("2025-11-02", "2027-02", rules())) == 28


# ---------------------------------------------------------------------------
# Money: units, formatting, rounding
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("units", "text"),
    [
        (0, "0"),
        (1, "0.0001"),
        (-1, "-0.0001"),
        (12345, "1.2345"),
        (6173, "0.6173"),
        (123450, "12.345"),
        (290000, "29"),
        (-290000, "-29"),
        (100000, "10"),
        (10**18, "100000000000000"),
        (-(10**18) - 5000, "-100000000000000.5"),
        (2**63 - 1, "922337203685477.5807"),
    ],
)
def test_format_units_is_a_plain_decimal_with_trailing_zeros_trimmed(units: int, text: str):
    assert format_units(units) == text
    assert "e" not in format_units(units).lower()
    assert Decimal(format_units(units)) == Decimal(units).scaleb(-4)


@pytest.mark.parametrize(
    ("value", "units"),
    [("0.1", 1000), ("30", 300000), ("0.0999", 999), ("-1.5", -15000), ("0.00005", 1), ("-0.00005", -1)],
)
def test_to_units_is_exact(value: str, units: int):
    assert to_units(value) == units
    assert to_units(Decimal(value)) == units


@pytest.mark.parametrize(
    ("quantity", "price", "expected"),
    [
        ("1.2345", "0.5", "0.6173"),  # 0.61725 rounds half up
        ("-1.2345", "0.5", "-0.6173"),  # half away from zero
        ("12345", "0.001", "12.345"),
        ("0.0001", "0.5", "0.0001"),  # 0.00005 rounds up
        ("0.0001", "0.4", "0"),  # 0.00004 rounds down
        ("3", "0.1", "0.3"),
        ("7.5", "0.02", "0.15"),
        ("10", "0", "0"),
        ("1", "123", "123"),
    ],
)
def test_round_half_up_units_rounds_quantity_times_price_to_four_decimals(
    quantity: str, price: str, expected: str
):
    out = round_half_up_units(np.array([to_units(quantity)], dtype=np.int64), Decimal(price))
    assert out.dtype == np.int64
    assert format_units(int(out[0])) == expected


def test_round_half_up_units_is_exact_for_huge_values():
    quantity = np.array([9 * 10**17, -(9 * 10**17) - 5, 10**18 + 5, 0], dtype=np.int64)
    price = Decimal("0.0123")
    expected = [int((Decimal(int(q)) * price).quantize(Decimal(1), rounding=ROUND_HALF_UP)) for q in quantity]
    assert round_half_up_units(quantity, price).tolist() == expected
    # The huge path and the fast path agree on the same values.
    small = np.array([12345, -12345, 5], dtype=np.int64)
    assert round_half_up_units(small, Decimal("0.5")).tolist() == [6173, -6173, 3]


def test_round_half_up_units_of_nothing_is_nothing():
    assert round_half_up_units(np.array([], dtype=np.int64), Decimal("0.5")).tolist() == []
