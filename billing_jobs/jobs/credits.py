"""What finance and support ask of the credits ledger: the export, an account's
balance and history, the month's roll-forward, and its exceptions.

Written periods are read from the ledger; days after the last written period are
computed from the source data as a preview (marked so), never written.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from fractions import Fraction
from typing import Any, TextIO

from sqlalchemy import BigInteger, Connection, Engine, cast, func, select

from billing_jobs.db.billing_tables import credit_entries, credit_lots, rejects
from billing_jobs.db.credit_reads import (
    credit_sources_exist,
    ledger_exists,
    published_entries,
    read_code_redemptions,
    read_top_ups,
    written_periods,
)
from billing_jobs.db.reads import day_number as sql_day_number
from billing_jobs.db.reads import read_frame
from billing_jobs.db.sql import Chunk
from billing_jobs.frames import pd
from billing_jobs.jobs.ledger import read_events, states_at
from billing_jobs.jobs.warehouse import CENTS, DAY, STRING, UNITS, Field, Row, Rows, write_csv
from billing_jobs.rules.calendar import Month, day_from_number, day_number, local_midnight_utc
from billing_jobs.rules.credits import (
    ARREARS,
    DRAW,
    EXPIRE,
    FUND,
    HELD_SIGN,
    REFUND,
    REFUNDABLE,
    REPAY,
    RESTORE,
    AccountState,
    LotState,
    refund_money,
    run_account,
)
from billing_jobs.rules.money import format_cents, format_units
from billing_jobs.rules.rejects import RejectStatus
from billing_jobs.rules.top_ups import decide_codes, validate_top_ups
from billing_jobs.settings import Settings

# contract.md, Ledger export; an empty `lot_id`, `corrects` or `money` is a null in Parquet.
LEDGER_FIELDS = [
    Field("entry_id", STRING),
    Field("account_id", STRING),
    Field("lot_id", STRING),
    Field("kind", STRING),
    Field("day", DAY),
    Field("period", STRING),
    Field("corrects", STRING),
    Field("credits", UNITS),
    Field("money", CENTS),
]


class LedgerMissing(RuntimeError):
    """The jobs' tables or the credits source tables do not exist."""


def _entries(conn: Connection, *where: Any) -> pd.DataFrame:
    e = credit_entries.c
    stmt = select(
        e.entry_id,
        e.account_id,
        e.lot_id,
        e.kind,
        sql_day_number(conn, e.day).label("day"),
        e.cause,
        e.period,
        e.corrects,
        e.revision,
        e.credit_units,
        e.money_cents,
    ).where(*where)
    return read_frame(conn, stmt, ints=["day", "revision", "credit_units"])


def ledger_rows(engine: Engine, period: str) -> Rows:
    """The ledger entries of `period`, ordered by day, account, lot, kind (code points)."""
    with engine.connect() as conn:
        if not ledger_exists(conn):
            raise LedgerMissing("the jobs' tables do not exist yet: run `billing-jobs db upgrade`")
        df = _entries(conn, credit_entries.c.period == period, published_entries(conn))
    rows = sorted(
        df.itertuples(index=False),
        key=lambda r: (r.day, r.account_id, r.lot_id, r.kind, r.cause, r.corrects, r.revision, r.entry_id),
    )
    typed: list[Row] = [
        (
            r.entry_id,
            r.account_id,
            r.lot_id or None,
            r.kind,
            day_from_number(r.day),
            r.period,
            r.corrects or None,
            int(r.credit_units),
            None if r.money_cents is None or pd.isna(r.money_cents) else int(r.money_cents),
        )
        for r in rows
    ]
    return Rows(LEDGER_FIELDS, [typed])


def export_ledger(engine: Engine, period: str, out: TextIO) -> int:
    """The ledger entries of `period` as CSV (contract.md, Ledger export)."""
    return write_csv(ledger_rows(engine, period), out)


@dataclass(frozen=True)
class Balance:
    account_id: str
    day: date
    written_through: date | None  # the ledger's last written day; later days are a preview
    lots: list[dict[str, Any]]
    arrears: int
    entries: pd.DataFrame  # account's entries (written and previewed), with a `source` column

    @property
    def held(self) -> int:
        return sum(int(lot["held_units"]) for lot in self.lots)

    def as_json(self, currency: str) -> dict[str, Any]:
        return {
            "account_id": self.account_id,
            "date": self.day.isoformat(),
            "written_through": self.written_through.isoformat() if self.written_through else None,
            "held": format_units(self.held),
            "arrears": format_units(self.arrears),
            "balance": format_units(self.held - self.arrears),
            "currency": currency,
            "refundable_money": format_cents(sum(int(lot["refundable_cents"]) for lot in self.lots)),
            "lots": [
                {
                    "lot_id": lot["lot_id"],
                    "channel": lot["channel"],
                    "held": format_units(lot["held_units"]),
                    "credits": format_units(lot["credit_units"]),
                    "money_paid": format_cents(lot["money_cents"]),
                    "valid_from": lot["valid_from"],
                    "valid_until": lot["valid_until"],
                    "refundable_money": format_cents(lot["refundable_cents"]),
                }
                for lot in self.lots
            ],
        }


def _state_from_ledger(conn: Connection, account: str, cutoff: int) -> tuple[AccountState, pd.DataFrame]:
    """The account's lots and arrears at the end of day `cutoff` (from its entries), and
    its entries of days up to it."""
    state = states_at(conn, Chunk.only(account), cutoff, published=True).get(account, AccountState())
    entries = _entries(conn, credit_entries.c.account_id == account, published_entries(conn))
    return state, entries[entries["day"] <= cutoff]


def account_balance(engine: Engine, settings: Settings, account: str, day: date) -> Balance:
    """The account's lots and arrears at the end of `day`: the ledger's written days, then
    the source data replayed for the days after them."""
    with engine.connect() as conn:
        if not credit_sources_exist(conn):
            raise LedgerMissing(
                "the credits source tables (top_ups, redemption_codes, refund_requests) do not exist"
            )
        has_ledger = ledger_exists(conn)
        periods = written_periods(conn) if has_ledger else []
        written_through = Month.parse(periods[-1]).last_day if periods else None
        cutoff = min(day, written_through) if written_through else None
        if cutoff is not None:
            state, written = _state_from_ledger(conn, account, day_number(cutoff))
            written = written.assign(source="ledger")
        else:
            state, written = AccountState(), pd.DataFrame()
        preview = pd.DataFrame()
        if cutoff is None or day > cutoff:
            end = local_midnight_utc(day + timedelta(days=1), settings.zone)
            codes = read_code_redemptions(conn, end)
            source = read_events(
                conn,
                settings,
                Chunk.only(account),
                day,
                codes=codes,
                code_decisions=decide_codes(codes),
                has_ledger=has_ledger,
            )
            events = source.events.get(account)
            if events is not None:
                after = day_number(cutoff) if cutoff is not None else None
                ledger = run_account(
                    events, day_number(day), settings.validity_days, start=state, after=after
                )
                state = ledger.state
                preview = pd.DataFrame(
                    [
                        (account, lot, kind, d, cause, credits, money)
                        for (lot, kind, d, cause), (credits, money) in ledger.entries.items()
                    ],
                    columns=["account_id", "lot_id", "kind", "day", "cause", "credit_units", "money_cents"],
                ).assign(source="preview")
    d = day_number(day)
    lots = []
    for lot in sorted(state.lots.values(), key=LotState.order):
        s = lot.spec
        if s.valid_until <= d and lot.held == 0:
            continue
        refundable = s.channel in REFUNDABLE and s.valid_from <= d < s.valid_until
        lots.append(
            {
                "lot_id": s.lot_id,
                "channel": s.channel,
                "held_units": lot.held,
                "credit_units": s.credits,
                "money_cents": s.money,
                "valid_from": day_from_number(s.valid_from).isoformat(),
                "valid_until": day_from_number(s.valid_until).isoformat(),
                "refundable_cents": refund_money(lot.held, s.money, s.credits) if refundable else 0,
            }
        )
    entries = (
        pd.concat([f for f in (written, preview) if not f.empty], ignore_index=True)
        if (not written.empty or not preview.empty)
        else pd.DataFrame(
            columns=["account_id", "lot_id", "kind", "day", "cause", "credit_units", "money_cents", "source"]
        )
    )
    return Balance(account, day, written_through, lots, state.arrears, entries)


def history_rows(balance: Balance, month: Month) -> list[dict[str, str]]:
    """The account's entries of days in `month`, day by day (written, then previewed)."""
    first, last = day_number(month.first_day), day_number(month.last_day)
    df = balance.entries
    df = df[(df["day"] >= first) & (df["day"] <= last)]
    rows = sorted(
        df.itertuples(index=False),
        key=lambda r: (int(r.day), r.source != "ledger", str(r.lot_id), r.kind, r.cause),
    )
    out = []
    for r in rows:
        money = r.money_cents
        out.append(
            {
                "day": day_from_number(int(r.day)).isoformat(),
                "kind": r.kind,
                "lot_id": r.lot_id,
                "cause": r.cause,
                "credits": format_units(int(r.credit_units)),
                "money": ""
                if money is None or pd.isna(money) or r.kind not in (FUND, REFUND)
                else format_cents(int(money)),
                "source": r.source,
                "corrects": getattr(r, "corrects", "") or "",
            }
        )
    return out


REPORT_COLUMNS = [
    "account_id",
    "opening_credits",
    "funded_online",
    "funded_wire",
    "funded_code",
    "funded_restore",
    "drawn_compute",
    "drawn_invoices",
    "restored",
    "repaid",
    "expired",
    "refunded",
    "closing_credits",
    "opening_arrears",
    "arrears_change",
    "closing_arrears",
    "funded_money",
    "refunded_money",
    "opening_money_at_cost",
    "drawn_money_at_cost",
    "expired_money_at_cost",
    "closing_money_at_cost",
]


def _at_cost(units: int, lot: tuple[str, int, int]) -> int:
    """Cents of `units` credits of a lot at its cost per credit, rounded half up."""
    _, credits, money = lot
    if credits <= 0:
        return 0
    value = Fraction(abs(units) * money, credits)
    cents = int(value + Fraction(1, 2))
    return cents if units >= 0 else -cents


# (kind, cause) -> the report column its credits go to (None: by the lot's channel)
_MOVES = {
    (DRAW, "compute"): "drawn_compute",
    (DRAW, "invoice"): "drawn_invoices",
    RESTORE: "restored",
    REPAY: "repaid",
    EXPIRE: "expired",
    REFUND: "refunded",
}
_COST_SIGN = {
    DRAW: ("drawn_money_at_cost", 1),
    RESTORE: ("drawn_money_at_cost", -1),
    REPAY: ("drawn_money_at_cost", 1),
    EXPIRE: ("expired_money_at_cost", 1),
}


def _read_report_rows(
    engine: Engine, period: str, account: str | None = None
) -> tuple[pd.DataFrame, dict[str, tuple[str, int, int]]]:
    with engine.connect() as conn:
        if not ledger_exists(conn):
            raise LedgerMissing("the jobs' tables do not exist yet: run `billing-jobs db upgrade`")
        e = credit_entries.c
        stmt = (
            select(
                e.account_id,
                e.lot_id,
                e.kind,
                e.cause,
                e.period,
                cast(func.sum(e.credit_units), BigInteger).label("credit_units"),
                cast(func.coalesce(func.sum(e.money_cents), 0), BigInteger).label("money_cents"),
            )
            .where(
                e.period <= period,
                published_entries(conn),
                *([e.account_id == account] if account is not None else []),
            )
            .group_by(e.account_id, e.lot_id, e.kind, e.cause, e.period)
        )
        df = read_frame(conn, stmt, ints=["credit_units", "money_cents"], aggregate=True)
        df["before"] = df["period"] < period
        df = df.drop(columns=["period"])
        lo = credit_lots.c
        lots = read_frame(
            conn,
            select(lo.lot_id, lo.channel, lo.credit_units, lo.money_cents).where(
                *([lo.account_id == account] if account is not None else [])
            ),
            ints=["credit_units", "money_cents"],
        )
    cost = {
        r.lot_id: (r.channel, int(r.credit_units), int(r.money_cents)) for r in lots.itertuples(index=False)
    }
    return df, cost


def month_report(engine: Engine, period: str, only: str | None = None) -> pd.DataFrame:
    """The month's roll-forward per account (credit units and cents), from the ledger: what
    the entries of periods before `period` left (opening), the movements booked in
    `period` (corrections of earlier months included), and the closing. Money at cost
    is each lot's cost per credit, rounded half up per lot. only: that account's row alone."""
    df, cost = _read_report_rows(engine, period, only)
    if df.empty:
        return pd.DataFrame(columns=REPORT_COLUMNS)
    acc: dict[str, dict[str, int]] = {}
    held: dict[tuple[str, str], list[int]] = {}  # (account, lot) -> [opening, closing]
    for r in df.itertuples(index=False):
        row = acc.setdefault(r.account_id, dict.fromkeys(REPORT_COLUMNS[1:], 0))
        units, earlier = int(r.credit_units), bool(r.before)
        if r.kind == ARREARS:
            row["opening_arrears" if earlier else "arrears_change"] += units
            continue
        change = HELD_SIGN.get(r.kind, 0) * units
        cell = held.setdefault((r.account_id, r.lot_id), [0, 0])
        cell[1] += change
        if earlier:
            cell[0] += change
            continue
        lot = cost.get(r.lot_id, ("", 0, 0))
        if r.kind == FUND:
            row[f"funded_{lot[0] or 'restore'}"] += units
            row["funded_money"] += int(r.money_cents)
        else:
            row[_MOVES.get((r.kind, r.cause)) or _MOVES.get(r.kind) or "drawn_compute"] += units
        if r.kind == REFUND:
            row["refunded_money"] += int(r.money_cents)
        if r.kind in _COST_SIGN:
            column, sign = _COST_SIGN[r.kind]
            row[column] += sign * _at_cost(units, lot)
    for (account, lot_id), (opening, closing) in held.items():
        row = acc[account]
        lot = cost.get(lot_id, ("", 0, 0))
        row["opening_credits"] += opening
        row["closing_credits"] += closing
        row["opening_money_at_cost"] += _at_cost(opening, lot)
        row["closing_money_at_cost"] += _at_cost(closing, lot)
    for row in acc.values():
        row["closing_arrears"] = row["opening_arrears"] + row["arrears_change"]
    return pd.DataFrame([{"account_id": a, **v} for a, v in sorted(acc.items())], columns=REPORT_COLUMNS)


MONEY_COLUMNS = {c for c in REPORT_COLUMNS if c.endswith("money") or c.endswith("at_cost")}


def format_report_row(row: Mapping[str, Any]) -> list[str]:
    out = []
    for c in REPORT_COLUMNS:
        v = row[c]
        if c == "account_id":
            out.append(str(v))
        elif c in MONEY_COLUMNS:
            out.append(format_cents(int(v)))
        else:
            out.append(format_units(int(v)))
    return out


def month_exceptions(engine: Engine, settings: Settings, month: Month) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The month's price exceptions (from the source) and rejected top-ups and refund
    requests (as recorded by the runs; not those a later run closed)."""
    with engine.connect() as conn:
        if not credit_sources_exist(conn):
            raise LedgerMissing(
                "the credits source tables (top_ups, redemption_codes, refund_requests) do not exist"
            )
        start = local_midnight_utc(month.first_day, settings.zone)
        end = local_midnight_utc(month.last_day + timedelta(days=1), settings.zone)
        top = read_top_ups(conn, end, Chunk(), start)
        codes = read_code_redemptions(conn, end)
        _, _, exceptions = validate_top_ups(
            top, settings, settings.top_up_terms(), codes, decide_codes(codes)
        )
        recorded = pd.DataFrame(columns=["source_table", "source_id", "reason", "detail"])
        if ledger_exists(conn):
            r = rejects.c
            recorded = read_frame(
                conn,
                select(r.source_table, r.source_id, r.reason, r.detail, r.status).where(
                    r.period == str(month),
                    r.source_table.in_(["top_ups", "refund_requests"]),
                    r.status != RejectStatus.CLOSED,  # closed: a later run found the row good
                ),
            )
    return exceptions, recorded
