"""The credits rules (`credits.md`) on plain data: pricing, lots, the draw order,
arrears, restores, refunds, expiry. The same examples run through the commands in
`tests/integration/test_credits_examples.py`."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal

import pytest

from billing_jobs.rules.calendar import day_number
from billing_jobs.rules.credits import (
    CODE,
    ONLINE,
    AccountEvents,
    Ledger,
    LotSpec,
    WrittenRefund,
    price_cents,
    refund_money,
    run_account,
    tier_prices,
    wire_credits,
)
from billing_jobs.settings import load_settings

TERMS = load_settings().top_up_terms()
U = 10_000  # units per credit


def d(text: str) -> int:
    return day_number(date.fromisoformat(text))


def units(text: str) -> int:
    return int(Decimal(text) * U)


@pytest.mark.parametrize(
    ("credits", "cents"),
    [("100", 1000), ("999", 9990), ("1000", 9500), ("4999", 47491), ("5000", 45000), ("25000", 212500)],
)
def test_c1_a_top_up_is_priced_whole_at_the_tier_it_reaches(credits: str, cents: int) -> None:
    assert list(price_cents(TERMS, [units(credits)], [d("2026-05-01")])) == [cents]


def test_c1_below_the_smallest_top_up_there_is_no_price() -> None:
    assert list(price_cents(TERMS, [units("50")], [d("2026-05-01")])) == [-1]
    assert list(tier_prices(TERMS, [units("99.9999")], [d("2026-05-01")])) == [0]


def test_before_tiers_from_every_top_up_pays_the_first_tier_price() -> None:
    assert list(price_cents(TERMS, [units("5000")], [d("2026-03-25")])) == [50000]
    assert list(price_cents(TERMS, [units("5000")], [d("2026-03-26")])) == [45000]


@pytest.mark.parametrize(
    ("cents", "day", "expected"),
    [
        (46000, "2026-05-01", "5111.1111"),  # C2
        (44999, "2026-05-01", "4736.7368"),  # C3
        (46000, "2026-03-25", "4600"),  # C4
        (1000, "2026-05-01", "100"),
        (999, "2026-05-01", None),  # C5
    ],
)
def test_c2_to_c5_a_wire_buys_at_the_highest_tier_its_amount_reaches(
    cents: int, day: str, expected: str | None
) -> None:
    got = list(wire_credits(TERMS, [cents], [d(day)]))
    assert got == [units(expected) if expected else -1]


def test_pricing_works_on_whole_columns_of_huge_values_exactly() -> None:
    huge = 10**17  # credit units far beyond 64-bit products
    got = price_cents(TERMS, [huge, units("100")], [d("2026-05-01"), d("2026-05-01")])
    assert list(got) == [huge * 850 // 1_000_000, 1000]  # 1e13 credits at 0.085


def online(lot_id: str, credits: str, cents: int, paid: str, valid_days: int = 365) -> LotSpec:
    paid_at = datetime.fromisoformat(paid)
    day = day_number(paid_at.date())
    return LotSpec(lot_id, ONLINE, units(credits), cents, paid_at, day, day + valid_days)


def code(lot_id: str, credits: str, paid: str, valid_days: int) -> LotSpec:
    paid_at = datetime.fromisoformat(paid)
    day = day_number(paid_at.date())
    return LotSpec(lot_id, CODE, units(credits), 0, paid_at, day, day + valid_days)


def entry(ledger: Ledger, lot: str, kind: str, day: int) -> list[int]:
    """[credits, money] of a lot's entries of one kind on one day, whatever their cause."""
    cells = [v for k, v in ledger.entries.items() if k[:3] == (lot, kind, day)]
    assert cells, f"no {kind} entry for {lot!r} on day {day}"
    return [sum(c[0] for c in cells), sum(c[1] for c in cells)]


def has(ledger: Ledger, lot: str, kind: str, day: int) -> bool:
    return any(k[:3] == (lot, kind, day) for k in ledger.entries)


def totals(ledger_entries: dict[tuple[str, str, int, str], list[int]]) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for (lot, kind, _day, _cause), (credits, _money) in ledger_entries.items():
        out[(lot, kind)] = out.get((lot, kind), 0) + credits
    return out


LOT_A = online("A", "1000", 9500, "2026-05-01 10:00:00")
LOT_B = code("B", "50", "2026-05-10 09:00:00", 30)


def test_c6_the_lot_that_expires_first_is_drawn_first() -> None:
    events = AccountEvents("acc", [LOT_A, LOT_B], compute={d("2026-05-15"): units("60")})
    ledger = run_account(events, d("2026-05-31"), 365)
    assert entry(ledger, "B", "draw", d("2026-05-15"))[0] == units("50")
    assert entry(ledger, "A", "draw", d("2026-05-15"))[0] == units("10")


def test_c7_a_lot_expires_holding_what_is_left_and_a_later_draw_goes_to_arrears() -> None:
    lot = code("C", "100", "2026-05-01 08:00:00", 10)
    events = AccountEvents("acc", [lot], compute={d("2026-05-10"): units("5"), d("2026-05-11"): units("5")})
    ledger = run_account(events, d("2026-05-31"), 365)
    assert entry(ledger, "C", "draw", d("2026-05-10"))[0] == units("5")
    assert entry(ledger, "C", "expire", d("2026-05-10"))[0] == units("95")
    assert entry(ledger, "", "arrears", d("2026-05-11"))[0] == units("5")
    assert ledger.state.arrears == units("5")


def test_c8_a_refund_returns_what_the_lot_holds_pro_rata() -> None:
    events = AccountEvents(
        "acc",
        [LOT_A],
        compute={d("2026-05-15"): units("400")},
        refund_requests=[(d("2026-06-01"), "R1")],
    )
    ledger = run_account(events, d("2026-06-30"), 365)
    assert entry(ledger, "A", "refund", d("2026-06-01")) == [units("600"), 5700]
    assert ledger.state.lots["A"].held == 0


def test_c9_refund_money_is_rounded_half_up_to_cents() -> None:
    held = units("4999") - units("1234.5678")
    assert held == units("3764.4322")
    assert refund_money(held, 47491, units("4999")) == 35762


def test_c10_an_invoice_no_lot_can_pay_becomes_arrears_that_the_next_top_up_repays() -> None:
    lot = online("T", "100", 1000, "2026-06-03 12:00:00")
    events = AccountEvents("acc", [lot], invoices={d("2026-05-31"): units("29")})
    ledger = run_account(events, d("2026-06-30"), 365)
    assert entry(ledger, "", "arrears", d("2026-05-31"))[0] == units("29")
    assert entry(ledger, "T", "repay", d("2026-06-03"))[0] == units("29")
    assert entry(ledger, "", "arrears", d("2026-06-03"))[0] == -units("29")
    assert ledger.state.lots["T"].held == units("71")
    assert ledger.state.arrears == 0


def test_c11_of_two_lots_ending_the_same_day_the_cheaper_is_drawn_first() -> None:
    paid = online("P", "100", 1000, "2026-05-01 00:00:00", valid_days=40)
    free = code("F", "100", "2026-05-01 00:00:00", 40)
    events = AccountEvents("acc", [paid, free], compute={d("2026-05-02"): units("30")})
    ledger = run_account(events, d("2026-05-31"), 365)
    assert has(ledger, "F", "draw", d("2026-05-02"))
    assert not has(ledger, "P", "draw", d("2026-05-02"))


def test_c13_a_reversal_goes_back_in_the_reverse_of_the_draw_order() -> None:
    events = AccountEvents(
        "acc",
        [LOT_A, LOT_B],
        compute={d("2026-05-15"): units("60"), d("2026-05-20"): -units("5")},
    )
    ledger = run_account(events, d("2026-05-31"), 365)
    assert entry(ledger, "A", "restore", d("2026-05-20"))[0] == units("5")
    assert not has(ledger, "B", "restore", d("2026-05-20"))
    assert ledger.state.lots["A"].held == units("995")


def test_a_restore_beyond_what_was_drawn_becomes_a_lot_of_its_own() -> None:
    events = AccountEvents(
        "acc", [LOT_A], compute={d("2026-05-15"): units("10"), d("2026-05-16"): -units("25")}
    )
    ledger = run_account(events, d("2026-05-31"), 365)
    assert entry(ledger, "A", "restore", d("2026-05-16"))[0] == units("10")
    assert entry(ledger, "restore-acc-2026-05-16", "fund", d("2026-05-16"))[0] == units("15")
    spec = ledger.state.lots["restore-acc-2026-05-16"].spec
    assert spec.money == 0
    assert spec.valid_until == d("2026-05-16") + 365


def test_a_restore_pays_arrears_first() -> None:
    events = AccountEvents("acc", [], compute={d("2026-05-15"): units("10"), d("2026-05-16"): -units("4")})
    ledger = run_account(events, d("2026-05-31"), 365)
    assert entry(ledger, "", "arrears", d("2026-05-16"))[0] == -units("4")
    assert ledger.state.arrears == units("6")


def test_c14_a_refund_of_an_account_holding_only_a_code_refunds_nothing_and_is_recorded() -> None:
    events = AccountEvents("acc", [LOT_B], refund_requests=[(d("2026-05-20"), "R9")])
    ledger = run_account(events, d("2026-05-31"), 365)
    assert [(r.request_id, r.lot_id, r.credits, r.money) for r in ledger.refunds] == [("R9", "", 0, 0)]
    assert not [k for k in ledger.entries if k[1] == "refund"]


def test_a_written_refund_stays_as_written_and_what_the_lot_lacks_becomes_arrears() -> None:
    # The refund was written when A held 600; late usage has since drawn 100 more before it.
    events = AccountEvents(
        "acc",
        [LOT_A],
        compute={d("2026-05-15"): units("500")},
        refund_requests=[(d("2026-06-01"), "R1")],
        written_refunds={"R1": [WrittenRefund("A", units("600"), 5700)]},
    )
    ledger = run_account(events, d("2026-06-30"), 365)
    assert entry(ledger, "A", "refund", d("2026-06-01")) == [units("500"), 5700]
    assert entry(ledger, "", "arrears", d("2026-06-01"))[0] == units("100")


def test_an_expired_lot_is_not_refundable() -> None:
    lot = online("S", "100", 1000, "2026-05-01 00:00:00", valid_days=10)
    events = AccountEvents("acc", [lot], refund_requests=[(d("2026-05-11"), "R2")])
    ledger = run_account(events, d("2026-05-31"), 365)
    assert entry(ledger, "S", "expire", d("2026-05-10"))[0] == units("100")
    assert [r.lot_id for r in ledger.refunds] == [""]


def test_replaying_in_two_steps_from_the_state_between_equals_one_replay() -> None:
    events = AccountEvents(
        "acc",
        [LOT_A, LOT_B, online("Z", "100", 1000, "2026-06-05 00:00:00")],
        compute={d("2026-05-15"): units("60"), d("2026-06-02"): units("950"), d("2026-06-09"): -units("3")},
        invoices={d("2026-05-31"): units("29")},
        refund_requests=[(d("2026-06-20"), "R")],
    )
    whole = run_account(events, d("2026-06-30"), 365)
    first = run_account(events, d("2026-05-31"), 365)
    second = run_account(events, d("2026-06-30"), 365, start=first.state, after=d("2026-05-31"))
    combined = dict(first.entries)
    for key, value in second.entries.items():
        assert key not in combined
        combined[key] = value
    assert combined == whole.entries
    assert totals(whole.entries)[("Z", "refund")] > 0
