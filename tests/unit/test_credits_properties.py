"""Properties of the credits replay (`credits.md`, Invariants) over random accounts:
lots of every channel, signed compute, invoices, refund requests and written refunds."""

from __future__ import annotations

from datetime import datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from billing_jobs.rules.credits import (
    ARREARS,
    CODE,
    DRAW,
    EXPIRE,
    FUND,
    ONLINE,
    REFUND,
    REPAY,
    RESTORE,
    WIRE,
    AccountEvents,
    Ledger,
    LotSpec,
    WrittenRefund,
    run_account,
)

START = 20_600  # a day number (2026-05-25)
DAYS = 90
BASE = datetime(2026, 5, 25)  # noqa: DTZ001 - naive UTC, as the jobs hold instants


@st.composite
def lots(draw: st.DrawFn) -> list[LotSpec]:
    out = []
    for i in range(draw(st.integers(0, 5))):
        channel = draw(st.sampled_from([ONLINE, WIRE, CODE]))
        day = START + draw(st.integers(0, DAYS - 1))
        credits = draw(st.integers(1, 2_000_000))
        money = 0 if channel == CODE else draw(st.integers(0, 50_000))
        valid = draw(st.integers(1, 120))
        paid_at = BASE + timedelta(days=day - START, seconds=draw(st.integers(0, 86_399)))
        out.append(LotSpec(f"lot-{i}", channel, credits, money, paid_at, day, day + valid))
    return out


@st.composite
def accounts(draw: st.DrawFn) -> AccountEvents:
    amounts = st.integers(-300_000, 900_000)
    compute = draw(st.dictionaries(st.integers(START, START + DAYS - 1), amounts, max_size=25))
    month_ends = [START + 6, START + 37, START + 67]
    invoices = {d: draw(amounts) for d in month_ends if draw(st.booleans())}
    requests = [(START + draw(st.integers(0, DAYS - 1)), f"req-{i}") for i in range(draw(st.integers(0, 2)))]
    return AccountEvents("acct", draw(lots()), compute, invoices, requests)


def per_lot(ledger: Ledger) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (lot, kind, _day, _cause), (credits, _money) in ledger.entries.items():
        if lot:
            cell = out.setdefault(lot, {})
            cell[kind] = cell.get(kind, 0) + credits
    return out


@settings(max_examples=300, deadline=None)
@given(accounts())
def test_every_lot_balances_holds_nothing_negative_and_arrears_never_go_negative(
    events: AccountEvents,
) -> None:
    ledger = run_account(events, START + DAYS, 365)
    moved = per_lot(ledger)
    for lot_id, state in ledger.state.lots.items():
        k = moved.get(lot_id, {})
        assert state.held >= 0
        assert k.get(FUND, 0) + k.get(RESTORE, 0) == (
            k.get(DRAW, 0) + k.get(REPAY, 0) + k.get(EXPIRE, 0) + k.get(REFUND, 0) + state.held
        )
    assert ledger.state.arrears >= 0
    arrears = sum(v[0] for k, v in ledger.entries.items() if k[1] == ARREARS)
    assert arrears == ledger.state.arrears
    # the balance: funded - drawn + restored - expired - refunded (repays are draws of arrears)
    total = {
        kind: sum(v[0] for k, v in ledger.entries.items() if k[1] == kind)
        for kind in (FUND, DRAW, RESTORE, EXPIRE, REFUND, REPAY)
    }
    held = sum(s.held for s in ledger.state.lots.values())
    assert held == total[FUND] - total[DRAW] - total[REPAY] + total[RESTORE] - total[EXPIRE] - total[REFUND]


@settings(max_examples=300, deadline=None)
@given(accounts())
def test_refunded_money_never_exceeds_the_money_paid_for_a_lot(events: AccountEvents) -> None:
    ledger = run_account(events, START + DAYS, 365)
    paid = {lot.lot_id: lot.money for lot in events.lots}
    refunded: dict[str, int] = {}
    for (lot, kind, _day, _cause), (_credits, money) in ledger.entries.items():
        if kind == REFUND:
            refunded[lot] = refunded.get(lot, 0) + money
    for lot, money in refunded.items():
        assert money <= paid[lot]


@settings(max_examples=200, deadline=None)
@given(accounts(), st.integers(START, START + DAYS))
def test_replaying_month_by_month_from_the_state_between_equals_one_replay(
    events: AccountEvents, cut: int
) -> None:
    whole = run_account(events, START + DAYS, 365)
    first = run_account(events, cut, 365)
    rest = run_account(events, START + DAYS, 365, start=first.state, after=cut)
    combined = dict(first.entries)
    for key, value in rest.entries.items():
        assert key not in combined
        combined[key] = value
    assert combined == whole.entries


@settings(max_examples=200, deadline=None)
@given(accounts(), st.integers(0, 400_000))
def test_written_refunds_keep_their_money_and_lots_whatever_the_late_usage(
    events: AccountEvents, late: int
) -> None:
    first = run_account(events, START + DAYS, 365)
    written: dict[str, list[WrittenRefund]] = {}
    for r in first.refunds:
        written.setdefault(r.request_id, []).append(WrittenRefund(r.lot_id, r.credits, r.money))
    day = START + 3
    compute = dict(events.compute)
    compute[day] = compute.get(day, 0) + late
    later = AccountEvents(
        events.account_id, events.lots, compute, events.invoices, events.refund_requests, written
    )
    again = run_account(later, START + DAYS, 365)
    assert [(r.request_id, r.lot_id, r.credits, r.money) for r in again.refunds] == [
        (r.request_id, r.lot_id, r.credits, r.money) for r in first.refunds
    ]
    # Refund money per lot (a written refund of no money whose lot no longer holds anything
    # leaves no refund entry: only its arrears).
    money = lambda led: {k: v[1] for k, v in led.entries.items() if k[1] == REFUND and v[1]}  # noqa: E731
    assert money(again) == money(first)
