"""Reads for the credits ledger: top-ups, codes, refund requests, compute per account
and billing day, invoice totals, and what the ledger already holds.

Amounts are read as exact integers computed by the database (credit units of
1/10,000, money in cents), only where the value is usable; the reason a value is
not usable is read beside it (`reads.amount_problem`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Date,
    Integer,
    Select,
    String,
    and_,
    case,
    cast,
    func,
    inspect,
    literal,
    literal_column,
    or_,
    select,
    type_coerce,
)

from billing_jobs.db.billing_tables import (
    billing_runs,
    credit_entries,
    credit_inputs,
    credit_lot_states,
    credit_lots,
    credit_periods,
    credit_refunds,
    invoices,
)
from billing_jobs.db.engine import through_indexes
from billing_jobs.db.reads import (
    KEYS,
    amount_problem,
    day_number,
    day_pairs,
    pairs_of,
    raw,
    read_frame,
    summed_pairs,
    summed_units,
    tallies,
    ts_param,
    units,
    usable_amount,
    usable_groups,
)
from billing_jobs.db.source_tables import (
    accounts,
    compute_usage,
    projects,
    redemption_codes,
    refund_requests,
    top_ups,
)
from billing_jobs.db.sql import Chunk, among
from billing_jobs.frames import pd
from billing_jobs.rules import day_values
from billing_jobs.rules.calendar import EPOCH, Month, day_from_number, local_midnight_utc
from billing_jobs.rules.calendar import day_number as number_of
from billing_jobs.rules.credits import ARREARS, DRAWN_SIGN, FUND, HELD_SIGN

CREDIT_SOURCES = ("top_ups", "redemption_codes", "refund_requests")
LEDGER_TABLES = ("credit_entries", "credit_lots", "credit_periods", "credit_refunds", "credit_balances")


def credit_sources_exist(conn: Connection) -> bool:
    names = set(inspect(conn).get_table_names())
    return set(CREDIT_SOURCES) <= names


def ledger_exists(conn: Connection) -> bool:
    return set(LEDGER_TABLES) <= set(inspect(conn).get_table_names())


def cents(column: ColumnElement[Any]) -> ColumnElement[int]:
    return cast(func.round(column * 100), BigInteger)


def _epoch_seconds_sqlite(column: ColumnElement[Any]) -> ColumnElement[Any]:
    """Whole seconds since 1970 of a stored timestamp, its fraction cut off first:
    SQLite's date functions round fractions to milliseconds, which would move an
    instant in the last half millisecond before midnight to the next day."""
    return cast(func.strftime("%s", func.substr(type_coerce(column, String), 1, 19)), BigInteger)


def billing_day(
    conn: Connection,
    column: ColumnElement[Any],
    first: date,
    last: date,
    zone: ZoneInfo,
    origin: date = EPOCH,
) -> ColumnElement[int]:
    """The billing day number (days since `origin`, 1970-01-01 unless given, in `zone`)
    of a naive UTC timestamp column, for instants in days first..last, computed by the
    database (a day's offset in a read: one subtraction less per row).

    Days are grouped into runs of 24-hour days, where the day is the run's first day
    plus whole days elapsed since its start; a day of another length (a DST change)
    is a run of its own. A few WHEN branches per year, whatever the number of rows.
    """
    branches: list[tuple[ColumnElement[bool], ColumnElement[Any]]] = []
    epoch0 = datetime(1970, 1, 1)  # noqa: DTZ001 - naive UTC, as every instant inside the jobs
    run_first = first
    d = first
    while d <= last:
        start = local_midnight_utc(d, zone)
        end = local_midnight_utc(d + timedelta(days=1), zone)
        regular = end - start == timedelta(days=1)
        following = d + timedelta(days=1)
        next_regular = following <= last and (
            local_midnight_utc(following + timedelta(days=1), zone) - end == timedelta(days=1)
        )
        if not regular:
            branches.append((raw(conn, column) < ts_param(conn, end), literal((d - origin).days)))
            run_first = following
        elif not next_regular or following > last:
            run_start = local_midnight_utc(run_first, zone)
            if conn.dialect.name == "postgresql":
                # The run's days all have the same UTC offset: the local date is the date
                # of the instant shifted by it (a cast, about half the cost of epoch math).
                shift = int((datetime.combine(run_first, datetime.min.time()) - run_start).total_seconds())
                local = raw(conn, column) + literal_column(f"INTERVAL '{shift} seconds'")
                number = cast(local, Date) - literal_column(f"DATE '{origin.isoformat()}'")
                branches.append((raw(conn, column) < ts_param(conn, end), number))
            else:
                base = (run_first - origin).days
                offset = int((run_start - epoch0).total_seconds())
                elapsed = (_epoch_seconds_sqlite(column) - offset) / 86400
                branches.append((raw(conn, column) < ts_param(conn, end), base + cast(elapsed, BigInteger)))
            run_first = following
        d = following
    return cast(case(*branches, else_=None), BigInteger)


def read_code_redemptions(conn: Connection, end: datetime, start: datetime | None = None) -> pd.DataFrame:
    """Every redemption of a code by a known account before `end`, with the code's terms:
    top_up_id, code, paid_at, known_code, code_units, redeem_by, valid_days. start: only
    the codes redeemed at or after it (with their earlier redemptions, which decide
    whether a later one counts)."""
    t, rc = top_ups.c, redemption_codes.c
    stmt = (
        select(
            t.top_up_id,
            t.code,
            raw(conn, t.paid_at).label("paid_at"),
            rc.code.is_not(None).label("known_code"),
            units(conn, rc.credits).label("code_units"),
            raw(conn, rc.redeem_by).label("redeem_by"),
            cast(rc.valid_days, Integer).label("valid_days"),
        )
        .join(accounts, accounts.c.account_id == t.account_id)
        .outerjoin(redemption_codes, rc.code == t.code)
        .where(t.channel == "code", raw(conn, t.paid_at) < ts_param(conn, end))
    )
    if start is not None:
        recent = top_ups.alias("recent")
        stmt = stmt.where(
            t.code.in_(
                select(recent.c.code).where(
                    recent.c.channel == "code",
                    raw(conn, recent.c.paid_at) >= ts_param(conn, start),
                    raw(conn, recent.c.paid_at) < ts_param(conn, end),
                )
            )
        )
    df = read_frame(conn, stmt, timestamps=["paid_at"])
    original = df["redeem_by"]
    parsed = pd.Series(pd.NaT, index=df.index, dtype="datetime64[us]")
    known = original.notna()
    if known.any():
        parsed[known] = pd.to_datetime(original[known].astype(str), format="ISO8601").astype("datetime64[us]")
    df["redeem_by"] = parsed
    return df


def _top_up_columns(conn: Connection) -> list[ColumnElement[Any]]:
    t = top_ups.c
    return [
        t.top_up_id,
        t.account_id,
        t.channel,
        raw(conn, t.paid_at).label("paid_at"),
        t.code,
        amount_problem(conn, t.credits).label("credits_problem"),
        case((usable_amount(t.credits, signed=True), units(conn, t.credits)), else_=None).label(
            "credit_units"
        ),
        amount_problem(conn, t.amount_paid).label("amount_problem"),
        case((usable_amount(t.amount_paid, signed=True), cents(t.amount_paid)), else_=None).label(
            "amount_cents"
        ),
    ]


def read_top_ups(
    conn: Connection, end: datetime, chunk: Chunk, start: datetime | None = None
) -> pd.DataFrame:
    """The top-ups of the chunk's accounts paid before `end` (and at or after `start`)."""
    t = top_ups.c
    stmt = select(*_top_up_columns(conn)).where(
        chunk.clause(t.account_id), raw(conn, t.paid_at) < ts_param(conn, end)
    )
    if start is not None:
        stmt = stmt.where(raw(conn, t.paid_at) >= ts_param(conn, start))
    return read_frame(conn, stmt, timestamps=["paid_at"])


def read_unknown_account_top_ups(conn: Connection, start: datetime, end: datetime) -> pd.DataFrame:
    """Top-ups paid in [start, end) naming an account that does not exist."""
    t = top_ups.c
    stmt = (
        select(*_top_up_columns(conn))
        .outerjoin(accounts, accounts.c.account_id == t.account_id)
        .where(
            accounts.c.account_id.is_(None),
            raw(conn, t.paid_at) >= ts_param(conn, start),
            raw(conn, t.paid_at) < ts_param(conn, end),
        )
    )
    return read_frame(conn, stmt, timestamps=["paid_at"])


def read_refund_requests(
    conn: Connection, end: datetime, chunk: Chunk, start: datetime | None = None
) -> pd.DataFrame:
    """The refund requests of the chunk's accounts made before `end` (and at or after `start`)."""
    r = refund_requests.c
    stmt = select(r.request_id, r.account_id, raw(conn, r.requested_at).label("requested_at")).where(
        chunk.clause(r.account_id), raw(conn, r.requested_at) < ts_param(conn, end)
    )
    if start is not None:
        stmt = stmt.where(raw(conn, r.requested_at) >= ts_param(conn, start))
    return read_frame(conn, stmt, timestamps=["requested_at"])


def read_unknown_account_refunds(conn: Connection, start: datetime, end: datetime) -> pd.DataFrame:
    r = refund_requests.c
    stmt = (
        select(r.request_id, r.account_id, raw(conn, r.requested_at).label("requested_at"))
        .outerjoin(accounts, accounts.c.account_id == r.account_id)
        .where(
            accounts.c.account_id.is_(None),
            raw(conn, r.requested_at) >= ts_param(conn, start),
            raw(conn, r.requested_at) < ts_param(conn, end),
        )
    )
    return read_frame(conn, stmt, timestamps=["requested_at"])


def read_compute_per_day(
    conn: Connection, first: date, last: date, zone: ZoneInfo, chunk: Chunk
) -> pd.DataFrame:
    """account_id, day, compute_units: the usable compute rows of the chunk's projects
    summed per account and billing day, days first..last."""
    if first > last:
        return pd.DataFrame({"account_id": [], "day": [], "compute_units": []})
    return read_frame(
        conn,
        compute_per_day_query(conn, first, last, zone, chunk),
        ints=["day", "compute_units"],
        aggregate=True,
    )


@dataclass(frozen=True)
class ComputeDays:
    """A chunk's compute of some days per project and billing day (`read_compute_days`):
    `frame` holds project_id, account_id, day, compute_units, each project's rows
    together and in day order; `starts` is each project's first row, `accounts` each
    row's account as a number (the same for the rows of one account). The sums per
    project and per account and day are made from those arrays, without grouping the
    rows' texts again."""

    frame: pd.DataFrame
    starts: np.ndarray
    accounts: np.ndarray
    seen: int = 0  # the rows read, usable or not (`SourceTally`)
    unusable: tuple[str, ...] = ()  # the projects with a row that cannot count

    def per_project(self) -> pd.DataFrame:
        """project_id, compute_units: each project's days summed."""
        units = self.frame["compute_units"].to_numpy(dtype=np.int64)
        return pd.DataFrame(
            {
                "project_id": self.frame["project_id"].to_numpy(dtype=object)[self.starts],
                "compute_units": np.add.reduceat(units, self.starts) if len(units) else units,
            }
        )

    def per_account_day(self) -> pd.DataFrame:
        """account_id, day, compute_units: the projects' days summed per account and day,
        in the order of the accounts' numbers, then of the day."""
        day = self.frame["day"].to_numpy(dtype=np.int64)
        units = self.frame["compute_units"].to_numpy(dtype=np.int64)
        order = np.lexsort((day, self.accounts))
        account, day, units = self.accounts[order], day[order], units[order]
        new = np.ones(len(order), dtype=bool)
        new[1:] = (account[1:] != account[:-1]) | (day[1:] != day[:-1])
        first = np.flatnonzero(new)
        return pd.DataFrame(
            {
                "account_id": self.frame["account_id"].to_numpy(dtype=object)[order[first]],
                "day": day[first],
                "compute_units": np.add.reduceat(units, first) if len(units) else units,
            }
        )


def read_compute_days(conn: Connection, first: date, last: date, zone: ZoneInfo, chunk: Chunk) -> ComputeDays:
    """The usable compute rows of the chunk's projects summed per project and billing
    day, days first..last, in one scan (`ComputeDays`).

    What a month-end chunk derives both its waiver totals (per project) and the credits
    ledger's compute per account and day from. One row comes back per project, its rows'
    billing days (as offsets from `first`) and exact units as `day_pairs` that numpy
    turns into columns (a row object per row or per day would cost more than the
    sums); the projects are named through the chunk's accounts, so the usage is read
    in the index's project order.
    """
    columns = ["project_id", "account_id", "day", "compute_units"]
    none = np.empty(0, dtype=np.int64)
    if first > last:
        return ComputeDays(pd.DataFrame({c: [] for c in columns}), none, none)
    c = compute_usage.c
    start = local_midnight_utc(first, zone)
    end = local_midnight_utc(last + timedelta(days=1), zone)
    mine = select(projects.c.project_id, projects.c.account_id).where(chunk.clause(projects.c.account_id))
    named = mine.subquery()
    if (last - first).days >= KEYS:
        raise ValueError(f"compute is read {KEYS} days at most at a time, not {first}..{last}")
    base = number_of(first)
    offset = billing_day(conn, c.occurred_at, first, last, zone, origin=first)
    usable = usable_amount(c.credits, signed=True)
    rows = (
        select(
            c.project_id,
            *tallies(conn, usable),
            day_pairs(conn, offset, case((usable, units(conn, c.credits)), else_=None)).label("pairs"),
        )
        .where(
            c.project_id.in_(select(named.c.project_id)),
            raw(conn, c.occurred_at) >= ts_param(conn, start),
            raw(conn, c.occurred_at) < ts_param(conn, end),
        )
        .group_by(c.project_id)
        .subquery()
    )
    stmt = select(named.c.account_id, *rows.c).join(named, named.c.project_id == rows.c.project_id)
    with through_indexes(conn):
        groups = read_frame(conn, stmt, ints=["seen", "rows"], aggregate=True)
    seen, unusable, groups = usable_groups(groups, "pairs")
    counts = groups["rows"].to_numpy(dtype=np.int64)
    group, offsets, amounts = summed_pairs(counts, *pairs_of(groups["pairs"].tolist(), int(counts.sum())))
    days = offsets + base
    account_numbers, _ = pd.factorize(groups["account_id"].to_numpy(dtype=object))
    frame = pd.DataFrame(
        {
            "project_id": groups["project_id"].to_numpy(dtype=object)[group],
            "account_id": groups["account_id"].to_numpy(dtype=object)[group],
            "day": days,
            "compute_units": amounts,
        }
    )
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]]) if len(group) else none
    return ComputeDays(frame, starts, account_numbers.astype(np.int64)[group], seen, unusable)


def compute_per_day_query(
    conn: Connection, first: date, last: date, zone: ZoneInfo, chunk: Chunk
) -> Select[Any]:
    """The query of `read_compute_per_day`."""
    c = compute_usage.c
    start = local_midnight_utc(first, zone)
    end = local_midnight_utc(last + timedelta(days=1), zone)
    day = billing_day(conn, c.occurred_at, first, last, zone).label("day")
    usable = usable_amount(c.credits, signed=True)
    return (
        select(projects.c.account_id, day, summed_units(conn, c.credits, None).label("compute_units"))
        .join(projects, projects.c.project_id == c.project_id)
        .where(
            chunk.clause(projects.c.account_id),
            raw(conn, c.occurred_at) >= ts_param(conn, start),
            raw(conn, c.occurred_at) < ts_param(conn, end),
            usable,
        )
        .group_by(projects.c.account_id, day)
    )


def read_invoice_totals(
    conn: Connection, chunk: Chunk, last_period: str, first_period: str | None = None
) -> pd.DataFrame:
    """account_id, period, total_units of finalized invoices (regular and adjustments) of
    the periods up to `last_period` (from `first_period` on)."""
    inv = invoices.c
    where = [chunk.clause(inv.account_id), inv.status == "finalized", inv.period <= last_period]
    if first_period is not None:
        where.append(inv.period >= first_period)
    stmt = (
        select(inv.account_id, inv.period, cast(func.sum(inv.total_units), BigInteger).label("total_units"))
        .where(*where)
        .group_by(inv.account_id, inv.period)
    )
    return read_frame(conn, stmt, ints=["total_units"], aggregate=True)


def read_written_entries(
    conn: Connection,
    chunk: Chunk,
    last: date,
    *,
    after: date | None = None,
    except_accounts: frozenset[str] = frozenset(),
    settled: date | None = None,
) -> pd.DataFrame:
    """The ledger's entries of the chunk's accounts for days up to `last`, summed per
    (account, lot, kind, day, cause, period, corrects), with how many there are.

    after: only days after it, except for the accounts `except_accounts` (all days).
    settled: in any case only days after it (the settled periods are not compared).
    """
    e = credit_entries.c
    days = [e.day <= last]
    if settled is not None:
        days.append(e.day > settled)
    if after is not None and after != settled:
        later = e.day > after
        days.append(or_(later, among(e.account_id, sorted(except_accounts))) if except_accounts else later)
    stmt = (
        select(
            e.account_id,
            e.lot_id,
            e.kind,
            day_number(conn, e.day).label("day"),
            e.cause,
            e.period,
            e.corrects,
            cast(func.sum(e.credit_units), BigInteger).label("credit_units"),
            cast(func.coalesce(func.sum(e.money_cents), 0), BigInteger).label("money_cents"),
            cast(func.count(), BigInteger).label("entries"),
        )
        .where(chunk.clause(e.account_id), *days)
        .group_by(e.account_id, e.lot_id, e.kind, e.day, e.cause, e.period, e.corrects)
    )
    return read_frame(conn, stmt, ints=["day", "credit_units", "money_cents", "entries"], aggregate=True)


def read_written_refunds(conn: Connection, chunk: Chunk) -> pd.DataFrame:
    r = credit_refunds.c
    stmt = select(
        r.request_id,
        r.lot_id,
        r.account_id,
        day_number(conn, r.day).label("day"),
        r.credit_units,
        r.money_cents,
    ).where(chunk.clause(r.account_id))
    return read_frame(conn, stmt, ints=["day", "credit_units", "money_cents"])


def alive_after(lots: Any, day: int) -> ColumnElement[bool]:
    """The lots that may still matter after day number `day`: funded after it, or valid
    on a later day. (A lot whose last valid day is `day` or earlier holds nothing after
    it, and no later day draws from it, restores to it or refunds it.)"""
    return or_(lots.valid_from > day_from_number(day), lots.valid_until > day_from_number(day + 1))


def read_lots(conn: Connection, chunk: Chunk, alive_after_day: int | None = None) -> pd.DataFrame:
    """The chunk's stored lots (only those alive after `alive_after_day`, when given)."""
    lo = credit_lots.c
    stmt = select(
        lo.lot_id,
        lo.account_id,
        lo.channel,
        lo.credit_units,
        lo.money_cents,
        raw(conn, lo.paid_at).label("paid_at"),
        day_number(conn, lo.valid_from).label("valid_from"),
        day_number(conn, lo.valid_until).label("valid_until"),
    ).where(chunk.clause(lo.account_id))
    if alive_after_day is not None:
        stmt = stmt.where(alive_after(lo, alive_after_day))
    return read_frame(
        conn, stmt, ints=["credit_units", "money_cents", "valid_from", "valid_until"], timestamps=["paid_at"]
    )


def read_entry_sums(
    conn: Connection,
    chunk: Chunk,
    last_day: int,
    *,
    published: bool = False,
    alive: bool = False,
    after: int | None = None,
) -> pd.DataFrame:
    """account_id, lot_id, kind, credit_units: the chunk's entries of days up to `last_day`
    (and after day `after`, when given) summed per lot and kind (corrections included).
    published: only the entries a finished ledger write published (for readers; see
    `published_entries`). alive: only the arrears and the lots alive after `last_day`
    (`alive_after`): a replay from that day needs no other, and their entries are
    bounded by the lots' validity, not by the ledger's history."""
    e = credit_entries.c
    where = [e.day <= day_from_number(last_day)]
    if after is not None:
        where.append(e.day > day_from_number(after))
    if published:
        where.append(published_entries(conn))
    sums = (e.account_id, e.lot_id, e.kind, cast(func.sum(e.credit_units), BigInteger).label("credit_units"))
    if not alive:
        stmt = (
            select(*sums).where(chunk.clause(e.account_id), *where).group_by(e.account_id, e.lot_id, e.kind)
        )
        return read_frame(conn, stmt, ints=["credit_units"], aggregate=True)
    # Driven by the living lots, each one's entries found by the primary key's
    # (account, lot) prefix; the arrears by (account, ""): however long the ledger's
    # history, only the entries of those lots are read.
    lo = credit_lots.c
    living = (
        select(lo.account_id, lo.lot_id)
        .where(chunk.clause(lo.account_id), alive_after(lo, last_day))
        .subquery("living")
    )
    of_lots = (
        select(*sums)
        .select_from(
            living.join(
                credit_entries, and_(e.account_id == living.c.account_id, e.lot_id == living.c.lot_id)
            )
        )
        # The chunk's accounts on the entries too: PostgreSQL does not carry the
        # condition across the join, and would read every account's entries.
        .where(chunk.clause(e.account_id), *where)
        .group_by(e.account_id, e.lot_id, e.kind)
    )
    arrears = (
        select(*sums)
        .where(chunk.clause(e.account_id), e.lot_id == "", *where)
        .group_by(e.account_id, e.lot_id, e.kind)
    )
    frames = [read_frame(conn, stmt, ints=["credit_units"], aggregate=True) for stmt in (of_lots, arrears)]
    found = [f for f in frames if len(f)]
    return pd.concat(found, ignore_index=True) if found else frames[0]


STATE_COLUMNS = ["account_id", "lot_id", "held_units", "drawn_units", "funded_units"]


def lot_states_of(sums: pd.DataFrame) -> pd.DataFrame:
    """Entry sums per lot and kind (`read_entry_sums`) as each lot's credits held, drawn
    and funded (`STATE_COLUMNS`); the arrears as lot "", in held_units."""
    kind, amount = sums["kind"], sums["credit_units"].astype("int64")
    held = kind.map(HELD_SIGN).fillna(0).astype("int64") * amount
    held = held.where(kind != ARREARS, amount)
    frame = pd.DataFrame(
        {
            "account_id": sums["account_id"],
            "lot_id": sums["lot_id"],
            "held_units": held,
            "drawn_units": kind.map(DRAWN_SIGN).fillna(0).astype("int64") * amount,
            "funded_units": amount.where(kind == FUND, 0),
        }
    )
    return frame.groupby(["account_id", "lot_id"], as_index=False, sort=False).sum()


def _summed_states(*frames: pd.DataFrame) -> pd.DataFrame:
    found = [f for f in frames if len(f)]
    if not found:
        return pd.DataFrame({c: pd.Series(dtype=object if "_id" in c else "int64") for c in STATE_COLUMNS})
    if len(found) == 1:
        return found[0].reset_index(drop=True)
    both = pd.concat(found, ignore_index=True)
    return both.groupby(["account_id", "lot_id"], as_index=False, sort=False).sum()


def _stored_states(conn: Connection, accounts: list[str], period: Month, last_day: int) -> pd.DataFrame:
    """The stored states (`credit_lot_states`) of `accounts` at the end of `period`: the
    lots alive after day `last_day`, and the arrears rows (held_units NULL when the
    account had no arrears entry)."""
    st, lo = credit_lot_states.c, credit_lots.c
    columns = (st.account_id, st.lot_id, st.held_units, st.drawn_units, st.funded_units)
    of_lots = (
        select(*columns)
        .select_from(credit_lot_states.join(credit_lots, lo.lot_id == st.lot_id))
        # The accounts named on the lots too, or PostgreSQL reads every account's lots.
        .where(
            among(st.account_id, accounts),
            among(lo.account_id, accounts),
            st.period == str(period),
            alive_after(lo, last_day),
        )
    )
    arrears = select(*columns).where(
        among(st.account_id, accounts), st.period == str(period), st.lot_id == ""
    )
    frames = [read_frame(conn, stmt, aggregate=True) for stmt in (of_lots, arrears)]
    return pd.concat([f for f in frames if len(f)] or frames[:1], ignore_index=True)


def read_lot_states(conn: Connection, chunk: Chunk, last_day: int) -> tuple[pd.DataFrame, frozenset[str]]:
    """The chunk's state at the end of day `last_day` as the written entries give it
    (`STATE_COLUMNS`): the lots alive after that day, and an arrears row (lot "") for
    each account with an arrears entry by then. Also the accounts whose state at that
    day is stored (`credit_lot_states`).

    When `last_day` ends a month: the state stored at its end, for the accounts that
    have one; for the others, the state stored at the end of the month before and the
    entries of the month's days; for the rest, the living lots' entries summed (what a
    ledger written before migration 0015, or an account whose stored states a later
    entry dropped, needs)."""
    end = day_from_number(last_day)
    month = Month.of(end)
    rest = list(chunk.accounts or ())
    if chunk.accounts is None or end != month.last_day:
        return lot_states_of(read_entry_sums(conn, chunk, last_day, alive=True)), frozenset()
    found: list[pd.DataFrame] = []
    stored_at_end: frozenset[str] = frozenset()
    for period in (month, month.previous()):
        if not rest:
            break
        stored = _stored_states(conn, rest, period, last_day)
        known = set(stored.loc[stored["lot_id"] == "", "account_id"])
        if not known:
            continue
        # An arrears row with NULL held_units only says the account's state is stored.
        marker = stored["lot_id"].eq("") & stored["held_units"].isna()
        stored = stored[stored["account_id"].isin(known) & ~marker].astype(
            {"held_units": "int64", "drawn_units": "int64", "funded_units": "int64"}
        )
        if period == month:
            stored_at_end = frozenset(known)
        else:
            days = read_entry_sums(
                conn, Chunk(tuple(sorted(known))), last_day, alive=True, after=number_of(period.last_day)
            )
            stored = _summed_states(stored, lot_states_of(days))
        found.append(stored)
        rest = [a for a in rest if a not in known]
    if rest:
        found.append(lot_states_of(read_entry_sums(conn, Chunk(tuple(rest)), last_day, alive=True)))
    return _summed_states(*found), stored_at_end


def read_inputs(
    conn: Connection, chunk: Chunk, source: str, last_day: int, first_day: int | None = None
) -> pd.DataFrame:
    """account_id, day, credit_units of the stored inputs of one source, days up to
    `last_day` (from `first_day` on)."""
    ci = credit_inputs.c
    stmt = select(ci.account_id, ci.day, ci.credit_units).where(
        chunk.clause(ci.account_id), ci.source == source, ci.day <= last_day
    )
    if first_day is not None:
        stmt = stmt.where(ci.day >= first_day)
    return read_frame(conn, stmt, ints=["day", "credit_units"], aggregate=True)


def changed_compute_accounts(
    conn: Connection, first: date, cut: date, zone: ZoneInfo, chunk: Chunk
) -> set[str]:
    """The chunk's accounts whose compute per billing day, days first..cut, differs from
    the stored inputs: the recomputed totals (summed per account and day by the
    database) and the stored months' days negated, summed per account and day; a day
    whose sum is not zero differs. (A day that sums to zero draws and restores nothing,
    stored or not.)"""
    if first > cut:
        return set()
    return compute_differs(conn, read_compute_per_day(conn, first, cut, zone, chunk), first, cut, chunk)


def compute_differs(conn: Connection, now: pd.DataFrame, first: date, cut: date, chunk: Chunk) -> set[str]:
    """The chunk's accounts whose compute per billing day `now` (account_id, day,
    compute_units of days first..cut) differs from the stored inputs of those days."""
    ci = credit_inputs.c
    cut_day = (cut - date(1970, 1, 1)).days
    first_day = (first - date(1970, 1, 1)).days
    stored = read_frame(
        conn,
        select(ci.account_id, ci.day, ci.daily).where(
            chunk.clause(ci.account_id),
            ci.source == "compute",
            ci.day <= cut_day,
            ci.day >= int(day_values.month_start(np.array([first_day]))[0]),
        ),
        ints=["day"],
        aggregate=True,
    )
    was = day_values.to_days(stored)
    was = was.loc[(was["day"] >= first_day) & (was["day"] <= cut_day)]
    days = now["day"].to_numpy(dtype=np.int64)
    now = now.loc[(days >= first_day) & (days <= cut_day)]
    both = pd.DataFrame(
        {
            "account_id": np.concatenate(
                [now["account_id"].to_numpy(dtype=object), was["account_id"].to_numpy(dtype=object)]
            ),
            "day": np.concatenate([now["day"].to_numpy(dtype=np.int64), was["day"].to_numpy(dtype=np.int64)]),
            "units": np.concatenate(
                [now["compute_units"].to_numpy(dtype=np.int64), -was["units"].to_numpy(dtype=np.int64)]
            ),
        }
    )
    sums = both.groupby(["account_id", "day"], sort=False)["units"].sum()
    return set(sums[sums != 0].index.get_level_values("account_id"))


def accounts_with_state(conn: Connection, chunk: Chunk, period: Month) -> set[str]:
    """The chunk's accounts whose state at the end of `period` is stored
    (`credit_lot_states`; every account has an arrears row, a marker when it has no
    arrears). A write that adds an entry of a day up to the period's end, or changes a
    lot, drops the account's row (`db.ledger_writes.sync_lot_states`)."""
    st = credit_lot_states.c
    stmt = select(st.account_id).where(chunk.clause(st.account_id), st.period == str(period), st.lot_id == "")
    return {a for (a,) in conn.execute(stmt)}


def written_periods(conn: Connection) -> list[str]:
    return sorted(p for (p,) in conn.execute(select(credit_periods.c.period)))


def published_entries(conn: Connection) -> ColumnElement[bool]:
    """The entries that a finished ledger write published, for the readers (export, report).

    A ledger write commits its entries chunk by chunk and publishes them with its last
    transaction, which stamps its period's `last_written_at` with the latest
    `recorded_at` of any entry (see `jobs.ledger`). Entries recorded after the latest
    stamp belong to a write in progress, or to one killed before it finished (a later
    run completes and publishes them); so are entries of a run that has not succeeded.
    """
    e = credit_entries.c
    stamp = conn.execute(select(func.max(credit_periods.c.last_written_at))).scalar()
    succeeded = select(billing_runs.c.run_id).where(billing_runs.c.status == "succeeded")
    if stamp is None:
        return e.run_id.in_(succeeded)
    return or_(e.recorded_at <= stamp, e.run_id.in_(succeeded))


def ledger_accounts(conn: Connection) -> list[str]:
    """Every account the ledger may concern: the known accounts (in code-point order)."""
    ids = [a for (a,) in conn.execute(select(accounts.c.account_id))]
    return sorted(ids)
