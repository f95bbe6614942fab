"""Prepaid credits (`credits.md`): tier prices, lots, the draw order, arrears,
restores, refunds and expiry, as pure functions over plain data.

Units: credits in integer units of 1/10,000 credit (as everywhere in the jobs),
money in integer cents, days as day numbers (`rules.calendar`). No float anywhere.

Pricing works on whole columns (`tier_prices`, `wire_credits`, `price_cents`).
Consumption (`run_account`) is a replay of one account's days in order: each day's
draw depends on what every earlier day left in each lot, so it is a sequence by
nature; it touches only days on which something happens to the account.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from fractions import Fraction
from functools import cached_property

import numpy as np
import numpy.typing as npt

from billing_jobs.rules.calendar import day_from_number, day_number
from billing_jobs.rules.money import UNITS_PER_CREDIT

CENTS = 100
PRICE_SCALE = 10_000  # prices have at most 4 decimals: integer price units of 1/10,000 money

FUND, DRAW, RESTORE, EXPIRE, REFUND, REPAY, ARREARS = (
    "fund",
    "draw",
    "restore",
    "expire",
    "refund",
    "repay",
    "arrears",
)
KINDS = (FUND, DRAW, RESTORE, EXPIRE, REFUND, REPAY, ARREARS)
ONLINE, WIRE, CODE, RESTORED = "online", "wire", "code", "restore"
# causes: what moved the credits of an entry
TOP_UP, COMPUTE, INVOICE, EXPIRY = "top_up", "compute", "invoice", "expiry"
CHANNELS = (ONLINE, WIRE, CODE)
REFUNDABLE = (ONLINE, WIRE)
# How each kind of entry moves a lot's credits held and drawn (draws and repays minus
# restores); a lot's funded credits are its fund entries; lot "" holds the arrears.
HELD_SIGN = {FUND: 1, RESTORE: 1, DRAW: -1, REPAY: -1, EXPIRE: -1, REFUND: -1}
DRAWN_SIGN = {DRAW: 1, REPAY: 1, RESTORE: -1}

ObjArray = npt.NDArray[np.object_]


@dataclass(frozen=True)
class Tier:
    min_units: int  # credits, units of 1/10,000
    price: int  # money per credit, units of 1/10,000 money


@dataclass(frozen=True)
class TopUpTerms:
    """The `[top_up]` settings, in integer units."""

    tiers: tuple[Tier, ...]
    tiers_from: int  # day number
    validity_days: int = 365
    currency: str = "USD"

    @classmethod
    def of(
        cls,
        tiers: Sequence[tuple[Decimal, Decimal]],
        tiers_from: date,
        validity_days: int = 365,
        currency: str = "USD",
    ) -> TopUpTerms:
        return cls(
            tuple(Tier(int(m * UNITS_PER_CREDIT), int(p * PRICE_SCALE)) for m, p in tiers),
            day_number(tiers_from),
            validity_days,
            currency,
        )

    @property
    def smallest_units(self) -> int:
        return self.tiers[0].min_units

    @property
    def smallest_amount_cents(self) -> int:
        return self.tier_amounts_cents()[0]

    def tier_amounts_cents(self) -> list[int]:
        """Each tier's smallest top-up in cents: round_half_up(min_credits * price, 2)."""
        return [
            _round_div(t.min_units * t.price, UNITS_PER_CREDIT * PRICE_SCALE // CENTS) for t in self.tiers
        ]


def _round_div(numerator: int, denominator: int) -> int:
    """round_half_up(numerator / denominator) for numerator >= 0, denominator > 0."""
    return (2 * numerator + denominator) // (2 * denominator)


def _objects(values: Iterable[int] | npt.ArrayLike) -> ObjArray:
    """Exact Python integers in a numpy column (amounts may exceed 64 bits once multiplied)."""
    return np.array([int(v) for v in np.asarray(values).ravel()], dtype=object)


def tier_prices(terms: TopUpTerms, credit_units: npt.ArrayLike, days: npt.ArrayLike) -> ObjArray:
    """The price (units of 1/10,000 money per credit) of a top-up of each size on each day;
    0 where the size is below the smallest top-up. Volume pricing: the whole top-up at the
    price of the largest tier it reaches, from `tiers_from` on; the first tier's before."""
    c = np.asarray(credit_units, dtype=object)
    d = np.asarray(days, dtype=np.int64)
    mins = np.array([t.min_units for t in terms.tiers], dtype=object)
    prices = np.array([t.price for t in terms.tiers] + [0], dtype=object)
    reached = c.reshape(-1, 1) >= mins.reshape(1, -1)
    index = reached.sum(axis=1).astype(np.int64) - 1  # tiers are increasing: the count reached
    index = np.where((d < terms.tiers_from) & (index >= 0), 0, index)
    return _objects(prices[index])  # index -1 picks the 0 sentinel


def price_cents(terms: TopUpTerms, credit_units: npt.ArrayLike, days: npt.ArrayLike) -> ObjArray:
    """The amount in cents of each top-up: round_half_up(credits * price, 2); -1 below the smallest."""
    c = _objects(credit_units)
    p = tier_prices(terms, c, days)
    scale = UNITS_PER_CREDIT * PRICE_SCALE // CENTS
    amounts = (2 * c * p + scale) // (2 * scale)
    return _objects(np.where(p > 0, amounts, -1))


def wire_prices(terms: TopUpTerms, amount_cents: npt.ArrayLike, days: npt.ArrayLike) -> ObjArray:
    """The price (units of 1/10,000 money per credit) each wire buys at: the highest tier
    whose smallest amount it reaches (the first tier's before `tiers_from`); 0 below the
    smallest top-up."""
    a = _objects(amount_cents)
    d = np.asarray(days, dtype=np.int64)
    floors = np.array(terms.tier_amounts_cents(), dtype=object)
    prices = np.array([t.price for t in terms.tiers] + [0], dtype=object)
    reached = a.reshape(-1, 1) >= floors.reshape(1, -1)
    # the highest tier reached (tier amounts need not increase with the tier)
    highest = np.where(reached.any(axis=1), len(floors) - 1 - np.argmax(reached[:, ::-1], axis=1), -1).astype(
        np.int64
    )
    index = np.where((d < terms.tiers_from) & (highest >= 0), 0, highest)
    return _objects(prices[index])  # index -1 picks the 0 sentinel


def wire_credits(terms: TopUpTerms, amount_cents: npt.ArrayLike, days: npt.ArrayLike) -> ObjArray:
    """The credit units each wire buys: floor(amount / p, 4 decimals) at `wire_prices`;
    -1 below the smallest top-up."""
    a = _objects(amount_cents)
    p = wire_prices(terms, a, days)
    credits = (a * (UNITS_PER_CREDIT * PRICE_SCALE // CENTS)) // np.where(p > 0, p, 1)
    return _objects(np.where(p > 0, credits, -1))


def refund_money(held_units: int, money_cents: int, credit_units: int) -> int:
    """Money (cents) returned for `held_units` of a lot: round_half_up(held * paid / credits, 2)."""
    if credit_units <= 0 or held_units <= 0:
        return 0
    return _round_div(held_units * money_cents, credit_units)


# --- consumption ---------------------------------------------------------------------


@dataclass(frozen=True)
class LotSpec:
    """One lot as the source data define it."""

    lot_id: str
    channel: str  # online | wire | code | restore
    credits: int  # units
    money: int  # cents
    paid_at: datetime
    valid_from: int  # day number
    valid_until: int  # day number, exclusive

    @property
    def cost(self) -> Fraction:
        return Fraction(self.money, self.credits) if self.credits > 0 else Fraction(0)

    @cached_property
    def draw_key(self) -> tuple[int, Fraction, datetime, str]:
        """The draw order: the lot that expires first, then the cheapest, then the
        earliest paid (computed once per lot, not on every sort)."""
        return (self.valid_until, self.cost, self.paid_at, self.lot_id)


@dataclass
class LotState:
    spec: LotSpec
    held: int = 0
    drawn: int = 0  # draws and repays minus restores
    funded: int = 0

    def valid_on(self, day: int) -> bool:
        return self.spec.valid_from <= day < self.spec.valid_until

    def order(self) -> tuple[int, Fraction, datetime, str]:
        return self.spec.draw_key


@dataclass
class AccountState:
    """An account's credits at the end of a day: its lots and arrears."""

    lots: dict[str, LotState] = field(default_factory=dict)
    arrears: int = 0
    _ordered: list[LotState] = field(default_factory=list, repr=False, compare=False)

    def in_order(self) -> list[LotState]:
        """The lots in draw order (`LotSpec.draw_key`), sorted again only when lots
        were added (lots are never removed from a state)."""
        if len(self._ordered) != len(self.lots):
            self._ordered = sorted(self.lots.values(), key=LotState.order)
        return self._ordered


@dataclass(frozen=True)
class WrittenRefund:
    lot_id: str  # "" for a request that refunded nothing
    credits: int
    money: int


@dataclass(frozen=True)
class Refund:
    """What one request refunded from one lot (lot "" with 0: nothing to refund)."""

    request_id: str
    day: int
    lot_id: str
    credits: int
    money: int


@dataclass(frozen=True)
class AccountEvents:
    """What happens to one account, from the source data. Days are day numbers."""

    account_id: str
    lots: Sequence[LotSpec] = ()
    compute: Mapping[int, int] = field(default_factory=dict)  # day -> credit units (signed)
    invoices: Mapping[int, int] = field(default_factory=dict)  # month's last day -> units (signed)
    refund_requests: Sequence[tuple[int, str]] = ()  # (day, request_id)
    written_refunds: Mapping[str, Sequence[WrittenRefund]] = field(default_factory=dict)


@dataclass
class Ledger:
    """Entries of a replay: (lot_id, kind, day, cause) -> [credits, money]; lot_id "" for
    arrears. The cause says what moved the credits: top_up, compute, invoice, refund,
    expiry or restore."""

    entries: dict[tuple[str, str, int, str], list[int]] = field(default_factory=dict)
    refunds: list[Refund] = field(default_factory=list)
    state: AccountState = field(default_factory=AccountState)
    restore_lots: list[LotSpec] = field(default_factory=list)

    def add(self, lot_id: str, kind: str, day: int, cause: str, credits: int, money: int = 0) -> None:
        if credits == 0 and money == 0:
            return
        cell = self.entries.setdefault((lot_id, kind, day, cause), [0, 0])
        cell[0] += credits
        cell[1] += money


def restore_lot_id(account_id: str, day: int) -> str:
    return f"restore-{account_id}-{day_from_number(day).isoformat()}"


def run_account(
    events: AccountEvents,
    through: int,
    validity_days: int,
    *,
    start: AccountState | None = None,
    after: int | None = None,
) -> Ledger:
    """Replay one account's credits day by day up to day `through` (inclusive).

    start/after: continue from `start`, the state at the end of day `after` (events of
    days up to `after` are ignored). Returns the entries, the refunds and the final state.
    """
    ledger = Ledger(state=start if start is not None else AccountState())
    state = ledger.state
    first = -(10**9) if after is None else after + 1
    pending = sorted(
        (lot for lot in events.lots if first <= lot.valid_from <= through),
        key=lambda s: (s.valid_from, s.lot_id),
    )
    refunds: dict[int, list[str]] = {}
    for day, request_id in events.refund_requests:
        if first <= day <= through:
            refunds.setdefault(day, []).append(request_id)
    days: set[int] = {lot.valid_from for lot in pending}
    days.update(d for d in events.compute if first <= d <= through)
    days.update(d for d in events.invoices if first <= d <= through)
    days.update(refunds)
    days.update(
        s.spec.valid_until - 1 for s in state.lots.values() if first <= s.spec.valid_until - 1 <= through
    )
    days.update(lot.valid_until - 1 for lot in pending if lot.valid_until - 1 <= through)
    queue = sorted(days)
    heapq.heapify(queue)
    seen: set[int] = set()
    next_lot = 0
    while queue:
        day = heapq.heappop(queue)
        if day in seen:
            continue
        seen.add(day)
        # 1. fundings, by lot id
        while next_lot < len(pending) and pending[next_lot].valid_from == day:
            _fund(ledger, pending[next_lot], day)
            next_lot += 1
        # 2. compute, 3. invoices
        for cause, amount in ((COMPUTE, events.compute.get(day, 0)), (INVOICE, events.invoices.get(day, 0))):
            if amount > 0:
                _draw(ledger, day, amount, cause)
            elif amount < 0:
                lot = _restore(ledger, events.account_id, day, -amount, validity_days, cause)
                if lot is not None and lot.valid_until - 1 <= through:
                    heapq.heappush(queue, lot.valid_until - 1)
        # 4. refunds, by request id
        for request_id in sorted(refunds.get(day, [])):
            _refund(ledger, day, request_id, events.written_refunds.get(request_id))
        # 5. expiry
        for lot_state in sorted(state.lots.values(), key=lambda s: s.spec.lot_id):
            if lot_state.spec.valid_until == day + 1 and lot_state.held > 0:
                ledger.add(lot_state.spec.lot_id, EXPIRE, day, EXPIRY, lot_state.held)
                lot_state.held = 0
    return ledger


def _fund(ledger: Ledger, spec: LotSpec, day: int) -> None:
    state = ledger.state
    lot = state.lots.get(spec.lot_id)
    if lot is None:
        lot = state.lots[spec.lot_id] = LotState(spec)
    lot.held += spec.credits
    lot.funded += spec.credits
    ledger.add(spec.lot_id, FUND, day, TOP_UP, spec.credits, spec.money)
    if state.arrears > 0 and lot.held > 0:
        repaid = min(state.arrears, lot.held)
        lot.held -= repaid
        lot.drawn += repaid
        state.arrears -= repaid
        ledger.add(spec.lot_id, REPAY, day, TOP_UP, repaid)
        ledger.add("", ARREARS, day, TOP_UP, -repaid)


def _draw_order(state: AccountState, day: int) -> list[LotState]:
    return [lot for lot in state.in_order() if lot.valid_on(day)]


def _draw(ledger: Ledger, day: int, amount: int, cause: str) -> None:
    needed = amount
    for lot in ledger.state.in_order():
        if needed == 0:
            break
        if lot.held <= 0 or not lot.valid_on(day):
            continue
        given = min(lot.held, needed)
        if given > 0:
            lot.held -= given
            lot.drawn += given
            needed -= given
            ledger.add(lot.spec.lot_id, DRAW, day, cause, given)
    if needed > 0:
        ledger.state.arrears += needed
        ledger.add("", ARREARS, day, cause, needed)


def _restore(
    ledger: Ledger, account_id: str, day: int, amount: int, validity_days: int, cause: str
) -> LotSpec | None:
    """Give back `amount`: arrears first, then lots in the reverse draw order, then a new lot."""
    state = ledger.state
    rest = amount
    paid_back = min(state.arrears, rest)
    if paid_back:
        state.arrears -= paid_back
        rest -= paid_back
        ledger.add("", ARREARS, day, cause, -paid_back)
    for lot in reversed(_draw_order(state, day)):
        if rest == 0:
            break
        back = min(lot.drawn, rest)
        if back > 0:
            lot.held += back
            lot.drawn -= back
            rest -= back
            ledger.add(lot.spec.lot_id, RESTORE, day, cause, back)
    if rest == 0:
        return None
    lot_id = restore_lot_id(account_id, day)
    existing = state.lots.get(lot_id)
    if existing is None:
        spec = LotSpec(
            lot_id,
            RESTORED,
            rest,
            0,
            datetime.combine(day_from_number(day), datetime.min.time()),
            day,
            day + validity_days,
        )
        existing = state.lots[lot_id] = LotState(spec)
        ledger.restore_lots.append(spec)
    else:
        spec = existing.spec
    existing.held += rest
    existing.funded += rest
    ledger.add(lot_id, FUND, day, cause, rest)
    return spec


def _refund(ledger: Ledger, day: int, request_id: str, written: Sequence[WrittenRefund] | None) -> None:
    state = ledger.state
    if written is not None:
        for item in written:
            if not item.lot_id:
                ledger.refunds.append(Refund(request_id, day, "", 0, 0))
                continue
            lot = state.lots.get(item.lot_id)
            held = lot.held if lot is not None else 0
            taken = min(held, item.credits)
            if lot is not None:
                lot.held -= taken
            ledger.add(item.lot_id, REFUND, day, REFUND, taken, item.money)
            if item.credits > taken:
                state.arrears += item.credits - taken
                ledger.add("", ARREARS, day, REFUND, item.credits - taken)
            ledger.refunds.append(Refund(request_id, day, item.lot_id, item.credits, item.money))
        return
    found = False
    for lot in sorted(state.lots.values(), key=lambda s: s.spec.lot_id):
        spec = lot.spec
        if spec.channel in REFUNDABLE and lot.valid_on(day) and lot.held > 0:
            money = refund_money(lot.held, spec.money, spec.credits)
            ledger.add(spec.lot_id, REFUND, day, REFUND, lot.held, money)
            ledger.refunds.append(Refund(request_id, day, spec.lot_id, lot.held, money))
            lot.held = 0
            found = True
    if not found:
        ledger.refunds.append(Refund(request_id, day, "", 0, 0))
