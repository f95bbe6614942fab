"""Which periods a ledger write settles and reads (`credits.md`, Ledger periods)."""

from __future__ import annotations

from datetime import date

import pytest

from billing_jobs.jobs.ledger import look_back_from, months_spanned, settled_end
from billing_jobs.rules.calendar import Month
from billing_jobs.settings import LOOK_BACK_KEYS, Settings, parse_settings

M = Month.parse
MARCH = M("2026-03")  # the effective date's month
WRITTEN = ["2026-04", "2026-05", "2026-06", "2026-07", "2026-08"]


@pytest.mark.parametrize(
    ("month", "late", "ledger_from", "settled"),
    [
        ("2026-09", 2, None, date(2026, 6, 30)),  # reads July, August, September
        ("2026-09", 3, None, date(2026, 5, 31)),
        ("2026-09", 0, None, date(2026, 8, 31)),
        ("2026-09", 2, "2026-06", date(2026, 5, 31)),
        ("2026-09", 2, "2026-04", date(2026, 3, 31)),
        ("2026-09", 2, "2026-03", None),  # the first period: all of them
        ("2026-09", 2, "2025-01", None),  # before the first period: all of them
        ("2026-09", 6, None, None),
        ("2026-05", 0, None, date(2026, 4, 30)),
        ("2026-04", 0, None, None),  # the first close: nothing written before it
        ("2026-06", 0, None, date(2026, 5, 31)),  # a re-close of a month before the last written
    ],
)
def test_the_settled_periods_end_before_the_window(
    month: str, late: int, ledger_from: str | None, settled: date | None
) -> None:
    look_from = look_back_from(M(month), late, M(ledger_from) if ledger_from else None)
    assert settled_end(M(month), WRITTEN, look_from, MARCH) == settled


def test_a_window_past_a_month_not_written_settles_only_what_is_written() -> None:
    # October closed with September never closed: September's days are not written yet.
    assert settled_end(M("2026-10"), WRITTEN, M("2026-10"), MARCH) == date(2026, 8, 31)


def test_months_spanned_counts_the_months_a_read_touches() -> None:
    assert months_spanned(date(2026, 7, 1), date(2026, 9, 30)) == 3
    assert months_spanned(date(2026, 3, 24), date(2026, 4, 30)) == 2
    assert months_spanned(date(2025, 12, 31), date(2026, 1, 1)) == 2
    assert months_spanned(date(2026, 5, 1), date(2026, 4, 30)) == 0


def test_late_data_months_defaults_to_2_and_is_in_the_settings_hash_not_in_the_prices() -> None:
    default, three = Settings(), parse_settings("[ledger]\nlate_data_months = 3\n")
    assert default.late_data_months == 2
    assert three.late_data_months == 3
    assert parse_settings("[ledger]\nlate_data_months = 0\n").late_data_months == 0
    assert default.billing_values()["ledger.late_data_months"] == "2"
    assert default.digest() != three.digest()
    assert default.digest(prices_only=True) == three.digest(prices_only=True)
    assert {"ledger.late_data_months"} == LOOK_BACK_KEYS


def test_a_month_closed_before_the_setting_existed_or_with_another_window_is_not_repriced() -> None:
    from billing_jobs.jobs.month_controls import Pin, changes

    now = Settings()
    old_values = {k: v for k, v in now.billing_values().items() if k not in LOOK_BACK_KEYS}
    assert changes(Pin(now.digest(prices_only=True), old_values), now) == []
    assert changes(Pin(now.digest(prices_only=True), None), now) == []
    other = parse_settings("[ledger]\nlate_data_months = 5\n")
    assert changes(Pin(other.digest(), other.billing_values()), now) == []
    cap = parse_settings("[storage_fee]\nmonthly_cap = 20\n")
    assert changes(Pin(cap.digest(), cap.billing_values()), now) == ["monthly_cap: '20' -> '29'"]
