"""The credits ledger (`credits.md`): what happened to each account's credits.

Month-end for M writes the ledger through M's last day, after M's invoices, in the
same run and under the same lock. Per chunk of accounts, in one transaction:

1. read the chunk's top-ups, codes, refund requests, compute per billing day,
   invoice totals, and what the ledger already holds (entries and refunds);
2. validate the top-ups (rejects with their reasons) and make their lots;
3. replay each account with the rules (`rules.credits.run_account`), written refunds
   taken as given;
4. write what differs from the written entries: an entry of a period not yet
   written goes into its own period; a difference in a written period is a
   correction in M's period, marking the period it corrects. A repeated run finds
   no difference and writes nothing.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
from sqlalchemy import Connection

from billing_jobs import logs
from billing_jobs.db.billing_tables import (
    credit_entries,
    credit_refunds,
)
from billing_jobs.db.credit_reads import (
    STATE_COLUMNS,
    accounts_with_state,
    changed_compute_accounts,
    compute_differs,
    credit_sources_exist,
    ledger_accounts,
    ledger_exists,
    lot_states_of,
    read_code_redemptions,
    read_compute_per_day,
    read_entry_sums,
    read_inputs,
    read_invoice_totals,
    read_lot_states,
    read_lots,
    read_refund_requests,
    read_top_ups,
    read_unknown_account_refunds,
    read_unknown_account_top_ups,
    read_written_entries,
    read_written_refunds,
    written_periods,
)
from billing_jobs.db.engine import serial_plans
from billing_jobs.db.ledger_writes import (
    INPUT_COMPUTE,
    INPUT_INVOICE,
    publish_period,
    sync_balances,
    sync_inputs,
    sync_lot_states,
    sync_lots,
)
from billing_jobs.db.reject_log import close_unfound
from billing_jobs.db.source_tables import refund_requests, top_ups
from billing_jobs.db.sql import Chunk
from billing_jobs.db.writes import bulk_insert, record_rejects
from billing_jobs.frames import pd
from billing_jobs.jobs.runner import Run
from billing_jobs.jobs.workers import run_chunks
from billing_jobs.phases import log_chunk, phase
from billing_jobs.rules import day_values
from billing_jobs.rules.calendar import (
    Month,
    day_number,
    local_midnight_utc,
)
from billing_jobs.rules.credits import (
    FUND,
    REFUND,
    RESTORED,
    AccountEvents,
    AccountState,
    LotSpec,
    LotState,
    WrittenRefund,
    run_account,
)
from billing_jobs.rules.rejects import Examined
from billing_jobs.rules.top_ups import (
    day_of,
    decide_codes,
    period_of_days,
    refund_rejects,
    validate_top_ups,
)
from billing_jobs.settings import Settings

log = logs.named("billing_jobs.ledger")


ACCOUNTS_PER_CHUNK = 2_000  # at most, per chunk of the ledger
CHUNKS_PER_WORKER = 4  # at least, while chunks hold more than one account


def accounts_per_chunk(accounts: int, workers: int) -> int:
    """The ledger's chunk size: at most `ACCOUNTS_PER_CHUNK` accounts, and small enough
    that every worker gets several chunks (a platform of 2,000 accounts is not one
    chunk on one core). The result never depends on it: each account is replayed whole."""
    return max(1, min(ACCOUNTS_PER_CHUNK, accounts // (max(workers, 1) * CHUNKS_PER_WORKER)))


def account_chunks(ids: list[str], workers: int, per_chunk: int | None = None) -> list[Chunk]:
    """The ledger's chunks of accounts `ids`, `per_chunk` each (else `accounts_per_chunk`)."""
    size = per_chunk or accounts_per_chunk(len(ids), workers)
    return [Chunk(tuple(ids[i : i + size]), n) for n, i in enumerate(range(0, len(ids), size))]


INPUT_COLUMNS_IN = ["account_id", "day", "source", "units", "daily"]

ENTRY_COLUMNS = ["account_id", "lot_id", "kind", "day", "cause", "credit_units", "money_cents"]
KEY = ["account_id", "lot_id", "kind", "day", "cause"]


@dataclass(frozen=True)
class KindTotals:
    """The entries of one kind a ledger write wrote (or would write): how many, how many
    of them correct a closed month, their credits and their money (None: no entry of
    the kind carries money)."""

    entries: int = 0
    corrections: int = 0
    credit_units: int = 0
    money_cents: int | None = None

    def __add__(self, other: KindTotals) -> KindTotals:
        money = (
            None
            if self.money_cents is None and other.money_cents is None
            else (self.money_cents or 0) + (other.money_cents or 0)
        )
        return KindTotals(
            self.entries + other.entries,
            self.corrections + other.corrections,
            self.credit_units + other.credit_units,
            money,
        )


def totals_by_kind(entries: pd.DataFrame) -> dict[str, KindTotals]:
    """Entries summed per kind, in exact integers: what a chunk sends back instead of its
    entries, so that the run's memory does not grow with the entries it writes."""
    if entries.empty:
        return {}
    out: dict[str, KindTotals] = {}
    for kind, part in entries.groupby("kind", sort=True):
        money = part["money_cents"].dropna()
        out[str(kind)] = KindTotals(
            len(part),
            int((part["corrects"] != "").sum()),
            sum(map(int, part["credit_units"])),
            sum(map(int, money)) if len(money) else None,
        )
    return out


def add_totals(into: dict[str, KindTotals], more: Mapping[str, KindTotals]) -> None:
    for kind, totals in more.items():
        into[kind] = into.get(kind, KindTotals()) + totals


@dataclass
class LedgerOutcome:
    """What a ledger write wrote (or, in a dry run, would write): the entries summed per
    kind (a chunk's entries are written by the chunk and not carried back), the rejects
    and the online top-ups paid at another price than their tier's."""

    by_kind: dict[str, KindTotals]
    rejects: pd.DataFrame
    exceptions: pd.DataFrame
    counts: dict[str, int] = field(default_factory=dict)
    skipped: str = ""


def _empty_entries() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in ENTRY_COLUMNS})


def _no_refunds() -> pd.DataFrame:
    return pd.DataFrame(columns=["request_id", "lot_id", "account_id", "day", "credit_units", "money_cents"])


@dataclass(frozen=True)
class ChunkTruth:
    """One chunk's ledger recomputed from the source data."""

    entries: pd.DataFrame
    refunds: pd.DataFrame
    lots: pd.DataFrame
    balances: pd.DataFrame
    rejects: pd.DataFrame
    exceptions: pd.DataFrame
    changed: frozenset[str] = frozenset()  # accounts replayed whole (else from the written state)
    inputs: pd.DataFrame = field(default_factory=pd.DataFrame)  # what to store in credit_inputs
    written_refunds: pd.DataFrame = field(default_factory=_no_refunds)  # as read before the replay
    quiet: frozenset[str] = frozenset()  # accounts whose written ledger stands (left out of the rest)

    def busy(self, chunk: Chunk) -> Chunk:
        """The chunk's accounts the truth holds: all of them but the quiet ones."""
        return _busy(chunk, self.quiet)


def _busy(chunk: Chunk, quiet: Collection[str]) -> Chunk:
    """`chunk` without the accounts `quiet` (a re-close's unchanged accounts)."""
    if not quiet:
        return chunk
    return Chunk(tuple(a for a in chunk.accounts or () if a not in quiet), chunk.index)


@dataclass(frozen=True)
class SourceEvents:
    """What the source data say happened to a chunk's accounts' credits through a day."""

    events: dict[str, AccountEvents]
    lots: pd.DataFrame
    rejects: pd.DataFrame
    exceptions: pd.DataFrame
    compute: pd.DataFrame  # account_id, day, compute_units: the days read
    invoices: dict[tuple[str, str], int]  # (account_id, period) -> total units


def read_events(
    conn: Connection,
    settings: Settings,
    chunk: Chunk,
    through: date,
    *,
    codes: pd.DataFrame,
    code_decisions: Mapping[str, str | None],
    extra_invoices: Mapping[tuple[str, str], int] | None = None,
    has_ledger: bool = True,
    compute_from: date | None = None,
    written: pd.DataFrame | None = None,
    settled: date | None = None,
    phases: dict[str, float] | None = None,
    known: KnownCompute | None = None,
) -> SourceEvents:
    """The chunk's lots, compute per day, invoice totals and refund requests through `through`
    (compute from `compute_from` on, else from the effective date). written: the refunds
    already written (read here when not given). settled: the last day of the settled
    periods; nothing of days up to it is read (their state comes from the written ledger)."""
    zone = settings.zone
    terms = settings.top_up_terms()
    end = local_midnight_utc(through + timedelta(days=1), zone)
    start = None if settled is None else local_midnight_utc(settled + timedelta(days=1), zone)
    top = read_top_ups(conn, end, chunk, start)
    lots, rejects, exceptions = validate_top_ups(top, settings, terms, codes, code_decisions)
    requests = read_refund_requests(conn, end, chunk, start)
    requests["day"] = day_of(requests["requested_at"], settings)
    effective = settings.effective_from
    with phase(phases, "compute_read"):
        compute = compute_per_day(
            conn, max(effective, compute_from or effective), through, zone, chunk, known
        )
    last_period = str(Month.of(through))
    first_period = None if settled is None else str(Month.of(settled).next())
    totals = (
        read_invoice_totals(conn, chunk, last_period, first_period)
        if has_ledger
        else pd.DataFrame({"account_id": [], "period": [], "total_units": []})
    )
    invoice_totals: dict[tuple[str, str], int] = {
        (a, p): int(t) for a, p, t in totals.itertuples(index=False)
    }
    for key, value in (extra_invoices or {}).items():
        invoice_totals[key] = invoice_totals.get(key, 0) + value
    per_account: dict[str, dict[str, Any]] = {}

    def slot(account: str) -> dict[str, Any]:
        return per_account.setdefault(
            account, {"lots": [], "compute": {}, "invoices": {}, "requests": [], "written": {}}
        )

    for lot in lots.itertuples(index=False):
        slot(lot.account_id)["lots"].append(
            LotSpec(
                lot.lot_id,
                lot.channel,
                int(lot.credit_units),
                int(lot.money_cents),
                lot.paid_at.to_pydatetime(),
                int(lot.valid_from),
                int(lot.valid_until),
            )
        )
    for account, days in _compute_by_account(compute):
        slot(account)["compute"] = days
    effective_day = day_number(effective) if settled is None else day_number(settled) + 1
    for (account, period), total in invoice_totals.items():
        last = day_number(Month.parse(period).last_day)
        if last >= effective_day and period <= last_period:
            slot(account)["invoices"][last] = total
    for r in requests.itertuples(index=False):
        slot(r.account_id)["requests"].append((int(r.day), r.request_id))
    if written is None:
        written = read_written_refunds(conn, chunk) if has_ledger else _no_refunds()
    for r in written.itertuples(index=False):
        slot(r.account_id)["written"].setdefault(r.request_id, []).append(
            WrittenRefund(r.lot_id, int(r.credit_units), int(r.money_cents))
        )
    events = {
        account: AccountEvents(account, s["lots"], s["compute"], s["invoices"], s["requests"], s["written"])
        for account, s in per_account.items()
    }
    return SourceEvents(events, lots, rejects, exceptions, compute, invoice_totals)


def _compute_by_account(compute: pd.DataFrame) -> Iterator[tuple[str, dict[int, int]]]:
    """Each account's compute of `compute` (account_id, day, compute_units; one row per
    account and day) as day -> units, a dict per account made from its slice of the
    columns (no Python step per row)."""
    if compute.empty:
        return
    codes, names = pd.factorize(compute["account_id"].to_numpy(dtype=object))
    order = np.argsort(codes, kind="stable")
    ranked = codes[order]
    days = compute["day"].to_numpy(dtype=np.int64)[order].tolist()
    units = compute["compute_units"].to_numpy(dtype=np.int64)[order].tolist()
    bounds = (np.flatnonzero(ranked[1:] != ranked[:-1]) + 1).tolist()
    for start, end in zip([0, *bounds], [*bounds, len(order)], strict=True):
        yield names[ranked[start]], dict(zip(days[start:end], units[start:end], strict=True))


def compute_per_day(
    conn: Connection, first: date, last: date, zone: ZoneInfo, chunk: Chunk, known: KnownCompute | None
) -> pd.DataFrame:
    """account_id, day, compute_units of days first..last: the days `known` holds from
    it, the others read."""
    if known is None or first > last or known.first > last or known.last < first:
        return read_compute_per_day(conn, first, last, zone, chunk)
    parts = []
    if first < known.first:
        parts.append(read_compute_per_day(conn, first, known.first - timedelta(days=1), zone, chunk))
    if known.last < last:
        parts.append(read_compute_per_day(conn, known.last + timedelta(days=1), last, zone, chunk))
    days = known.frame["day"].to_numpy(dtype=np.int64)
    inside = (days >= day_number(max(first, known.first))) & (days <= day_number(min(last, known.last)))
    parts.append(known.frame.loc[inside, ["account_id", "day", "compute_units"]])
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0].reset_index(drop=True)


def compute_chunk_ledger(
    conn: Connection,
    settings: Settings,
    chunk: Chunk,
    through: date,
    *,
    codes: pd.DataFrame,
    code_decisions: Mapping[str, str | None],
    extra_invoices: Mapping[tuple[str, str], int] | None = None,
    has_ledger: bool = True,
    cut: date | None = None,
    settled: date | None = None,
    phases: dict[str, float] | None = None,
    known: KnownCompute | None = None,
    recheck: Month | None = None,
) -> ChunkTruth:
    """Replay the chunk's accounts through day `through` on the source data.

    cut: the last day of the last written period before this one. An account whose
    inputs after `settled` up to `cut` (compute per day, invoice totals, lots, refund
    requests) are the ones the ledger was written with continues from its written state
    at `cut`: only the days after it are replayed and compared. Any other account is
    replayed from its written state at `settled` (the last day of the settled periods),
    or whole without one. Nothing of a day up to `settled` is read from the sources.

    recheck: `through` ends this month, a written period (a re-close): an account whose
    written ledger through it is the replay of today's inputs (`unchanged_accounts`) is
    not replayed, and the truth leaves it out (`ChunkTruth.quiet`).
    """
    if settled is not None and cut is not None and settled > cut:
        raise ValueError(f"the settled periods end ({settled}) after the cut ({cut})")
    window = None if cut is None else cut + timedelta(days=1)
    if window is None and settled is not None:
        window = settled + timedelta(days=1)
    with phase(phases, "read"):
        written_refunds = read_written_refunds(conn, chunk) if has_ledger else _no_refunds()
        source = read_events(
            conn,
            settings,
            chunk,
            through,
            codes=codes,
            code_decisions=code_decisions,
            extra_invoices=extra_invoices,
            has_ledger=has_ledger,
            compute_from=window,
            written=written_refunds,
            settled=settled,
            phases=phases,
            known=known,
        )
    lots, rejects, exceptions = source.lots, source.rejects, source.exceptions
    through_day = day_number(through)
    starts: dict[str, AccountState] = {}
    settled_starts: dict[str, AccountState] = {}
    changed: set[str] = set(chunk.accounts or ())
    columns = list(lots.columns)
    kept = [pd.DataFrame(columns=columns)]
    settled_day = None if settled is None else day_number(settled)
    # The lots a replay from the settled periods' end can touch (all of them without).
    with phase(phases, "state_read"):
        stored = read_lots(conn, chunk, settled_day) if cut is not None or settled is not None else None
    if cut is not None and stored is not None:
        with phase(phases, "history_check"):
            changed = changed_accounts(
                conn, settings, chunk, source, cut, stored, written_refunds, settled=settled
            )
    quiet: set[str] = set()
    if recheck is not None and has_ledger and chunk.accounts:
        with phase(phases, "quiet_check"):
            stored = read_lots(conn, chunk) if stored is None else stored
            quiet = _set_aside(
                conn, settings, chunk, source, recheck, stored, written_refunds, changed, cut, settled
            )
    if cut is not None and stored is not None:
        cut_day = day_number(cut)
        busy = _busy(chunk, quiet)
        with phase(phases, "state_read"):
            starts = {
                a: st
                for a, st in states_at(conn, busy, cut_day, stored[~stored["account_id"].isin(quiet)]).items()
                if a not in changed
            }
        kept.append(
            stored[
                (stored["channel"] == RESTORED)
                & (stored["valid_from"] <= cut_day)
                & ~stored["account_id"].isin(changed)
            ][columns]
        )
        if changed and settled != cut:
            first = settings.effective_from if settled is None else settled + timedelta(days=1)
            with phase(phases, "history_read"):
                history = read_compute_per_day(conn, first, cut, settings.zone, Chunk(tuple(sorted(changed))))
            for account, day, amount in history.itertuples(index=False):
                if account not in source.events:
                    source.events[account] = AccountEvents(account, compute={})
                source.events[account].compute[int(day)] = int(amount)  # type: ignore[index]
    if settled_day is not None and stored is not None:
        # Lots of the settled periods stay as written; replays start from their state.
        kept.insert(0, stored[stored["valid_from"] <= settled_day][columns])
        if changed:
            whole = Chunk(tuple(sorted(changed)))
            with phase(phases, "state_read"):
                settled_starts = states_at(
                    conn, whole, settled_day, stored[stored["account_id"].isin(changed)]
                )
    rows: list[tuple[str, str, str, int, str, int, int]] = []
    refunds: list[tuple[str, str, str, int, int, int]] = []
    restore_lots: list[dict[str, Any]] = []
    balances: list[tuple[str, int, int]] = []
    cut_number = None if cut is None else day_number(cut)
    with phase(phases, "replay"):
        for account in sorted(set(source.events) | set(starts) | set(settled_starts)):
            events = source.events.get(account, AccountEvents(account))
            # From the written state at the cut, at the settled periods' end, or whole.
            start, after = starts.get(account), cut_number
            if start is None:
                start, after = settled_starts.get(account), settled_day
            ledger = run_account(
                events,
                through_day,
                settings.validity_days,
                start=start,
                after=after if start is not None else None,
            )
            rows.extend(
                (account, lot, kind, day, cause, credits, money)
                for (lot, kind, day, cause), (credits, money) in ledger.entries.items()
            )
            refunds.extend(
                (r.request_id, r.lot_id, account, r.day, r.credits, r.money) for r in ledger.refunds
            )
            restore_lots.extend(_lot_record(account, spec) for spec in ledger.restore_lots)
            balances.append(_balance(account, ledger.state))
    entries = pd.DataFrame(rows, columns=ENTRY_COLUMNS) if rows else _empty_entries()
    refund_frame = pd.DataFrame(
        refunds, columns=["request_id", "lot_id", "account_id", "day", "credit_units", "money_cents"]
    )
    all_lots = pd.concat(
        [*kept[:1], lots, *kept[1:], pd.DataFrame(restore_lots, columns=columns)], ignore_index=True
    ).drop_duplicates("lot_id", keep="last")
    inputs = _inputs(source, changed, cut, settings, through, settled)
    return ChunkTruth(
        entries,
        refund_frame,
        _without(all_lots, quiet),
        pd.DataFrame(balances, columns=["account_id", "held_units", "arrears_units"]),
        rejects,
        exceptions,
        frozenset(changed),
        _without(inputs, quiet),
        written_refunds,
        frozenset(quiet),
    )


def _set_aside(
    conn: Connection,
    settings: Settings,
    chunk: Chunk,
    source: SourceEvents,
    recheck: Month,
    stored: pd.DataFrame,
    written_refunds: pd.DataFrame,
    changed: set[str],
    cut: date | None,
    settled: date | None,
) -> set[str]:
    """The quiet accounts of a re-close of `recheck` (`unchanged_accounts`; never one
    whose inputs up to `cut` changed), taken out of `changed` and of the events to replay."""
    quiet = unchanged_accounts(
        conn, settings, chunk, source, recheck, stored, written_refunds, after=cut or settled
    )
    if cut is not None:
        quiet -= changed
    changed -= quiet
    for account in quiet:
        source.events.pop(account, None)
    return quiet


def _without(frame: pd.DataFrame, accounts: set[str]) -> pd.DataFrame:
    if not accounts or frame.empty:
        return frame
    return frame[~frame["account_id"].isin(accounts)].reset_index(drop=True)


def _inputs(
    source: SourceEvents,
    changed: set[str],
    cut: date | None,
    settings: Settings,
    through: date,
    settled: date | None = None,
) -> pd.DataFrame:
    """The inputs the replay used, as stored (`credit_inputs`): compute per account and
    month in the month form of `rules.day_values` (every day after `settled` for a
    replayed account, the days after `cut` for the others; both are months' last days),
    and invoice totals per account and month (as the month's last day, `daily` empty)."""
    rows: list[tuple[str, int, int]] = []
    first = None if cut is None else day_number(cut)
    for account, events in source.events.items():
        whole = first is None or account in changed
        rows.extend(
            (account, day, units)
            for day, units in events.compute.items()
            if whole or day > first  # type: ignore[operator]
        )
    compute = day_values.to_months(pd.DataFrame(rows, columns=["account_id", "day", "units"]))
    invoices: list[tuple[str, int, str, int, str]] = []
    effective = day_number(settings.effective_from if settled is None else settled + timedelta(days=1))
    for (account, period), total in source.invoices.items():
        last = day_number(Month.parse(period).last_day)
        if effective <= last <= day_number(through):
            invoices.append((account, last, INPUT_INVOICE, total, ""))
    return pd.concat(
        [
            compute.assign(source=INPUT_COMPUTE)[INPUT_COLUMNS_IN],
            pd.DataFrame(invoices, columns=INPUT_COLUMNS_IN),
        ],
        ignore_index=True,
    )


def _lot_keys(lots: pd.DataFrame, cut_day: int, after: int | None = None) -> set[tuple[Any, ...]]:
    """The lots funded by top-ups up to `cut_day` (after day `after`), as comparable tuples."""
    valid_from = lots["valid_from"].to_numpy(dtype=np.int64)
    picked = (lots["channel"] != RESTORED).to_numpy(dtype=bool) & (valid_from <= cut_day)
    if after is not None:
        picked &= valid_from > after
    found = lots.loc[picked]
    return set(
        zip(
            found["account_id"].tolist(),
            found["lot_id"].tolist(),
            found["channel"].tolist(),
            found["credit_units"].to_numpy(dtype=np.int64).tolist(),
            found["money_cents"].to_numpy(dtype=np.int64).tolist(),
            found["valid_from"].to_numpy(dtype=np.int64).tolist(),
            found["valid_until"].to_numpy(dtype=np.int64).tolist(),
            strict=True,
        )
    )


def changed_accounts(
    conn: Connection,
    settings: Settings,
    chunk: Chunk,
    source: SourceEvents,
    cut: date,
    stored_lots: pd.DataFrame,
    written_refunds: pd.DataFrame,
    *,
    settled: date | None = None,
    compute: pd.DataFrame | None = None,
) -> set[str]:
    """The chunk's accounts whose inputs for days after `settled` (or the effective date)
    up to `cut` differ from those the ledger was written with: compute per day (compared
    in the database; or `compute`, the days read already), invoice totals, lots and
    refund requests."""
    cut_day = day_number(cut)
    first = settings.effective_from if settled is None else settled + timedelta(days=1)
    first_day = day_number(first)
    changed = (
        changed_compute_accounts(conn, first, cut, settings.zone, chunk)
        if compute is None
        else compute_differs(conn, compute, first, cut, chunk)
    )
    stored = read_inputs(conn, chunk, INPUT_INVOICE, cut_day, first_day)
    now = {
        (a, day_number(Month.parse(p).last_day)): t
        for (a, p), t in source.invoices.items()
        if first_day <= day_number(Month.parse(p).last_day) <= cut_day
    }
    was = {(a, int(d)): int(u) for a, d, u in stored.itertuples(index=False)}
    changed.update(key[0] for key, _ in set(now.items()) ^ set(was.items()))
    after = None if settled is None else first_day - 1
    changed.update(
        t[0] for t in _lot_keys(stored_lots, cut_day, after) ^ _lot_keys(source.lots, cut_day, after)
    )
    written = set(written_refunds["request_id"])
    for account, events in source.events.items():
        if any(
            day <= cut_day and (after is None or day > after) and request not in written
            for day, request in events.refund_requests
        ):
            changed.add(account)
    return changed


def unchanged_accounts(
    conn: Connection,
    settings: Settings,
    chunk: Chunk,
    source: SourceEvents,
    month: Month,
    stored_lots: pd.DataFrame,
    written_refunds: pd.DataFrame,
    *,
    after: date | None = None,
) -> set[str]:
    """The chunk's accounts whose written ledger through the end of `month`, a written
    period, is the replay of today's inputs: their state at the month's end is stored
    (no write since changed their entries or lots up to it), and their inputs of the
    days after `after` (the cut, the settled periods' end, or the effective date) up to
    the month's end are the ones it was written with: compute per day (the days
    `source` holds, compared with the stored ones), invoice totals, lots, refund
    requests and the refunds written for them; and each restore lot of those days is
    valid for `validity_days`. A re-close need not replay them."""
    end = month.last_day
    last_day = day_number(end)
    candidates = accounts_with_state(conn, chunk, month)
    if not candidates:
        return set()
    changed = changed_accounts(
        conn,
        settings,
        chunk,
        source,
        end,
        stored_lots,
        written_refunds,
        settled=after,
        compute=source.compute,
    )
    first_day = day_number(settings.effective_from) if after is None else day_number(after) + 1
    restored = stored_lots[
        (stored_lots["channel"] == RESTORED)
        & (stored_lots["valid_from"] >= first_day)
        & (stored_lots["valid_from"] <= last_day)
        & (stored_lots["valid_until"] - stored_lots["valid_from"] != settings.validity_days)
    ]
    changed.update(restored["account_id"])
    asked = {
        (account, request, day)
        for account, events in source.events.items()
        for day, request in events.refund_requests
        if first_day <= day <= last_day
    }
    paid = written_refunds[(written_refunds["day"] >= first_day) & (written_refunds["day"] <= last_day)]
    answered = set(zip(paid["account_id"], paid["request_id"], paid["day"].astype(int), strict=True))
    changed.update(key[0] for key in asked ^ answered)
    return candidates - changed


def states_at(
    conn: Connection,
    chunk: Chunk,
    cut_day: int,
    lots: pd.DataFrame | None = None,
    *,
    published: bool = False,
) -> dict[str, AccountState]:
    """Each of the chunk's accounts' lots and arrears at the end of day `cut_day`, from the
    written ledger: the stored lots (`lots`, read here when not given), and their entries
    summed up to that day.

    published: what the readers show: only published entries, and only the lots they
    name (a lot stored by a ledger write still in progress has none yet)."""
    if published:
        sums = lot_states_of(read_entry_sums(conn, chunk, cut_day, published=True))
    else:
        sums, _ = read_lot_states(conn, chunk, cut_day)
    named = set(zip(sums["account_id"], sums["lot_id"], strict=True)) if published else set()
    states: dict[str, AccountState] = {}
    for r in (read_lots(conn, chunk) if lots is None else lots).itertuples(index=False):
        if int(r.valid_from) > cut_day:
            continue
        if published and (r.account_id, r.lot_id) not in named:
            continue
        spec = LotSpec(
            r.lot_id,
            r.channel,
            int(r.credit_units),
            int(r.money_cents),
            r.paid_at.to_pydatetime(),
            int(r.valid_from),
            int(r.valid_until),
        )
        states.setdefault(r.account_id, AccountState()).lots[r.lot_id] = LotState(spec)
    for account, lot_id, held, drawn, funded in sums[STATE_COLUMNS].itertuples(index=False):
        state = states.setdefault(account, AccountState())
        if lot_id == "":
            state.arrears += int(held)
            continue
        lot = state.lots.get(lot_id)
        if lot is None:
            continue
        lot.held += int(held)
        lot.drawn += int(drawn)
        lot.funded += int(funded)
    return states


def _lot_record(account: str, spec: LotSpec) -> dict[str, Any]:
    return {
        "lot_id": spec.lot_id,
        "account_id": account,
        "channel": spec.channel,
        "paid_at": pd.Timestamp(spec.paid_at),
        "valid_from": spec.valid_from,
        "credit_units": spec.credits,
        "money_cents": spec.money,
        "valid_until": spec.valid_until,
    }


def _balance(account: str, state: AccountState) -> tuple[str, int, int]:
    return account, sum(lot.held for lot in state.lots.values()), state.arrears


def entry_id(
    account: str, lot: str, kind: str, day: int, cause: str, period: str, corrects: str, revision: int
) -> str:
    key = "\x1f".join((account, lot, kind, str(day), cause, period, corrects, str(revision)))
    return "E" + hashlib.blake2b(key.encode("utf-8"), digest_size=12).hexdigest()


def ledger_diff(
    truth: pd.DataFrame, written: pd.DataFrame, month: Month, written_through: str | None
) -> pd.DataFrame:
    """The entries to write so that the ledger's sums per key equal the truth.

    written: sums per (account, lot, kind, day, cause, period, corrects) with counts.
    """
    if written.empty:
        sums = pd.DataFrame({c: pd.Series(dtype=object) for c in KEY}).assign(w_credits=0, w_money=0)
    else:
        sums = written.groupby(KEY, as_index=False, sort=False).agg(
            w_credits=("credit_units", "sum"), w_money=("money_cents", "sum")
        )
    t = truth.copy()
    t["credit_units"] = t["credit_units"].astype(np.int64)
    t["money_cents"] = t["money_cents"].astype(np.int64)
    for frame in (t, sums):
        frame["day"] = frame["day"].astype(np.int64)
    merged = t.merge(sums, on=KEY, how="outer")
    merged[["credit_units", "money_cents", "w_credits", "w_money"]] = (
        merged[["credit_units", "money_cents", "w_credits", "w_money"]].fillna(0).astype(np.int64)
    )
    merged["d_credits"] = merged["credit_units"] - merged["w_credits"]
    merged["d_money"] = merged["money_cents"] - merged["w_money"]
    out = merged[(merged["d_credits"] != 0) | (merged["d_money"] != 0)].copy()
    if out.empty:
        return pd.DataFrame(
            columns=[*KEY, "period", "corrects", "revision", "credit_units", "money_cents", "entry_id"]
        )
    own = period_of_days(out["day"])
    closed = own <= written_through if written_through else pd.Series(False, index=out.index)
    out["period"] = np.where(closed, str(month), own)
    out["corrects"] = np.where(closed, own, "")
    if written.empty:
        out["revision"] = 0
    else:
        revisions = written.groupby([*KEY, "period", "corrects"], as_index=False, sort=False).agg(
            revision=("entries", "sum")
        )
        revisions["day"] = revisions["day"].astype(np.int64)
        out = out.merge(revisions, on=[*KEY, "period", "corrects"], how="left")
        out["revision"] = out["revision"].fillna(0).astype(np.int64)
    out["credit_units"] = out["d_credits"]
    has_money = out["kind"].isin([FUND, REFUND])
    out["money_cents"] = pd.Series(
        [m if h else None for m, h in zip(out["d_money"].tolist(), has_money.tolist(), strict=True)],
        index=out.index,
        dtype=object,
    )
    # Plain lists, not Series: iterating a pandas column costs more than the hash.
    out["entry_id"] = list(
        map(
            entry_id,
            out["account_id"].tolist(),
            out["lot_id"].tolist(),
            out["kind"].tolist(),
            out["day"].astype(np.int64).tolist(),
            out["cause"].tolist(),
            out["period"].tolist(),
            out["corrects"].tolist(),
            out["revision"].astype(np.int64).tolist(),
        )
    )
    cols = [*KEY, "period", "corrects", "revision", "credit_units", "money_cents", "entry_id"]
    return out[cols].reset_index(drop=True)


LEDGER_COUNTS = (
    "ledger_entries",
    "ledger_corrections",
    "refunds_written",
    "lots_written",
    "accounts_replayed_whole",
    "accounts_unchanged",
    "topups_rejected",
    "price_exceptions",
    "ledger_periods_read",
)


def look_back_from(month: Month, late_data_months: int, ledger_from: Month | None = None) -> Month:
    """The first period a ledger write of `month` reads again: `ledger_from`, else the
    `late_data_months` periods before `month`."""
    if ledger_from is not None:
        return ledger_from
    first = month
    for _ in range(late_data_months):
        first = first.previous()
    return first


def settled_end(month: Month, periods: list[str], look_from: Month, first: Month) -> date | None:
    """The last day of the periods a ledger write of `month` takes as settled when it
    looks back to `look_from` (`credits.md`, Ledger periods): the day before
    `look_from`, or the end of the last period closed before `month` if that is
    earlier. None (nothing settled, every day replayed) when no period before `month`
    is closed, or `look_from` is at or before the first period, `first` (the month of
    the effective date: the first close writes every day from it on)."""
    before = [p for p in periods if p < str(month)]
    if not before or look_from <= min(first, Month.parse(periods[0])):
        return None
    return min(look_from.previous().last_day, Month.parse(before[-1]).last_day)


def months_spanned(first: date, last: date) -> int:
    """How many months the days first..last touch (0 if none)."""
    if first > last:
        return 0
    return (last.year - first.year) * 12 + last.month - first.month + 1


@dataclass(frozen=True)
class KnownCompute:
    """Compute per account and billing day of days first..last, already read (by the
    month-end's chunks, from their one read of the month): what a ledger chunk takes
    instead of reading those days again. For every account that has any."""

    first: date
    last: date
    frame: pd.DataFrame  # account_id, day, compute_units
    ordered: bool = False  # the frame is in account order (`of_parts`)

    @classmethod
    def of_parts(cls, first: date, last: date, parts: list[pd.DataFrame]) -> KnownCompute:
        """The chunks' parts in one frame in account order (code points), so that a
        ledger chunk's accounts are found by a binary search, not a scan of every row."""
        frame = (
            pd.concat(parts, ignore_index=True)
            if parts
            else pd.DataFrame({"account_id": [], "day": [], "compute_units": []})
        )
        ids = frame["account_id"].to_numpy()
        if len(ids) > 1 and not bool((ids[:-1] <= ids[1:]).all()):
            frame = frame.iloc[np.argsort(ids, kind="stable")].reset_index(drop=True)
        return cls(first, last, frame, ordered=True)

    def of(self, accounts: Sequence[str]) -> KnownCompute:
        """The part of `accounts`: when the frame is in account order, a slice between
        the first and the last of them first; then only theirs."""
        frame = self.frame
        if self.ordered and len(accounts) and len(frame):
            ids = frame["account_id"].to_numpy()
            lo = int(np.searchsorted(ids, min(accounts), side="left"))
            hi = int(np.searchsorted(ids, max(accounts), side="right"))
            frame = frame.iloc[lo:hi]
        return KnownCompute(self.first, self.last, frame[frame["account_id"].isin(accounts)])


@dataclass(frozen=True)
class LedgerPlan:
    """What every chunk of a ledger write shares (picklable, for worker processes)."""

    month: Month
    last: date
    cut: date | None
    written_through: str | None
    settled: date | None  # the last day of the settled periods (not read again)
    periods_read: int  # the periods whose source rows a chunk reads
    has_ledger: bool
    codes: pd.DataFrame
    decisions: dict[str, str | None]
    extra_invoices: dict[tuple[str, str], int]
    recheck: Month | None = None  # a re-close of this written period: unchanged accounts kept


def write_ledger(
    run: Run,
    month: Month,
    *,
    extra_invoices: Mapping[tuple[str, str], int] | None = None,
    through: date | None = None,
    workers: int = 1,
    per_chunk: int | None = None,
    ledger_from: Month | None = None,
    known: KnownCompute | None = None,
) -> LedgerOutcome:
    """Write (or in a dry run preview) the ledger through the last day of `month` (or
    `through`), per chunk of accounts on `workers` processes, looking for late data back
    to `ledger_from` (default: `[ledger] late_data_months` periods before `month`).
    known: the compute per account and day of the month's days, read already; each
    chunk is sent its own accounts' part of it."""
    settings = run.settings
    last = through or month.last_day
    for key in LEDGER_COUNTS:
        run.counts.setdefault(key, 0)
    look_from = look_back_from(month, settings.late_data_months, ledger_from)
    with run.engine.connect() as conn:
        if not credit_sources_exist(conn):
            empty = pd.DataFrame()
            return LedgerOutcome(
                {},
                empty,
                empty,
                skipped="the credits source tables (top_ups, redemption_codes, refund_requests) do not exist",
            )
        has_ledger = ledger_exists(conn)
        periods = written_periods(conn) if has_ledger else []
        before = [p for p in periods if p < str(month)]
        end = local_midnight_utc(last + timedelta(days=1), settings.zone)
        settled = settled_end(month, periods, look_from, Month.of(settings.effective_from))
        # The sources are read from the first day after the settled periods on.
        start = (
            datetime(1, 1, 1)  # noqa: DTZ001 - naive UTC, as every instant inside the jobs
            if settled is None
            else local_midnight_utc(settled + timedelta(days=1), settings.zone)
        )
        codes = read_code_redemptions(conn, end, None if settled is None else start)
        plan = LedgerPlan(
            month=month,
            last=last,
            cut=Month.parse(before[-1]).last_day if before and through is None else None,
            written_through=periods[-1] if periods else None,
            settled=settled,
            periods_read=months_spanned(
                settings.effective_from if settled is None else settled + timedelta(days=1), last
            ),
            has_ledger=has_ledger,
            codes=codes,
            decisions=decide_codes(codes),
            extra_invoices=dict(extra_invoices or {}),
            recheck=month if through is None and str(month) in periods else None,
        )
        ids = ledger_accounts(conn)
        # Top-ups and refund requests of accounts that do not exist: rejected (every one
        # after the settled periods up to the month's end; a reject recorded stays as it is).
        orphans = read_unknown_account_top_ups(conn, start, end)
        orphan_rejects = pd.DataFrame()
        if not orphans.empty:
            _, orphan_rejects, _ = validate_top_ups(
                orphans, settings, settings.top_up_terms(), codes, plan.decisions, known_accounts=False
            )
        orphan_requests = read_unknown_account_refunds(conn, start, end)
        if not orphan_requests.empty:
            orphan_rejects = pd.concat(
                [orphan_rejects, refund_rejects(orphan_requests, settings)], ignore_index=True
            )
    run.counts["ledger_periods_read"] = plan.periods_read
    log.info(
        "ledger.plan",
        period=str(month),
        look_from=str(look_from),
        settled_through=None if settled is None else settled.isoformat(),
        periods_read=plan.periods_read,
        accounts=len(ids),
    )
    chunks = account_chunks(ids, workers, per_chunk)
    by_kind: dict[str, KindTotals] = {}
    rejects: list[pd.DataFrame] = [orphan_rejects]
    exceptions: list[pd.DataFrame] = []
    each = {c.index: {"known": known.of(c.accounts or ())} for c in chunks} if known is not None else None
    for out in run_chunks(run, ledger_chunk, chunks, workers, each=each, plan=plan):
        add_totals(by_kind, out.by_kind)
        rejects.append(out.rejects)
        exceptions.append(out.exceptions)
    all_rejects = pd.concat(rejects, ignore_index=True)
    if not run.dry_run:
        run.write(_period_writer(month, all_rejects, run=run))
    all_exceptions = pd.concat(exceptions, ignore_index=True) if exceptions else pd.DataFrame()
    run.counts["topups_rejected"] = (
        int((all_rejects["source_table"] == "top_ups").sum()) if len(all_rejects) else 0
    )
    run.counts["price_exceptions"] = len(all_exceptions)
    return LedgerOutcome(
        by_kind,
        all_rejects,
        all_exceptions,
        {k: int(run.counts.get(k, 0)) for k in LEDGER_COUNTS},
    )


@dataclass(frozen=True)
class LedgerChunkOut:
    """What a ledger chunk sends back: its entries summed per kind, its rejects and price
    exceptions (the rows it wrote stay in the database)."""

    by_kind: dict[str, KindTotals]
    rejects: pd.DataFrame
    exceptions: pd.DataFrame


def ledger_chunk(
    run: Run, chunk: Chunk, *, plan: LedgerPlan, known: KnownCompute | None = None
) -> LedgerChunkOut:
    """One chunk of a ledger write: replay, diff with what is written, write (one
    transaction). Returns the entries written (or previewed) summed per kind, the
    chunk's rejects and price exceptions."""
    phases: dict[str, float] = {}
    started = time.perf_counter()
    with run.engine.connect() as conn:
        serial_plans(conn)
        truth = compute_chunk_ledger(
            conn,
            run.settings,
            chunk,
            plan.last,
            codes=plan.codes,
            code_decisions=plan.decisions,
            extra_invoices=plan.extra_invoices,
            has_ledger=plan.has_ledger,
            cut=plan.cut,
            settled=plan.settled,
            phases=phases,
            known=known,
            recheck=plan.recheck,
        )
        busy = truth.busy(chunk)
        with phase(phases, "written_read"):
            written = (
                read_written_entries(
                    conn,
                    busy,
                    plan.last,
                    after=plan.cut,
                    except_accounts=truth.changed,
                    settled=plan.settled,
                )
                if plan.has_ledger and busy.accounts != ()
                else pd.DataFrame()
            )
    with phase(phases, "diff"):
        new = ledger_diff(truth.entries, written, plan.month, plan.written_through)
    seen = set(zip(truth.written_refunds["request_id"], truth.written_refunds["lot_id"], strict=True))
    refunds = (
        truth.refunds[
            [
                (r, lo) not in seen
                for r, lo in zip(truth.refunds["request_id"], truth.refunds["lot_id"], strict=True)
            ]
        ]
        if not truth.refunds.empty
        else truth.refunds
    )
    run.count("ledger_entries", len(new))
    run.count("ledger_corrections", int((new["corrects"] != "").sum()) if len(new) else 0)
    run.count("refunds_written", len(refunds))
    run.count("accounts_replayed_whole", len(truth.changed))
    run.count("accounts_unchanged", len(truth.quiet))
    if not run.dry_run:  # a chunk of quiet accounts too: its transaction finds nothing to write
        with phase(phases, "write"):
            run.write(
                _writer(
                    busy,
                    new,
                    refunds,
                    truth,
                    plan.month,
                    plan.cut,
                    plan.settled,
                    run=run,
                    last=plan.last,
                    written_through=plan.written_through,
                    phases=phases,
                )
            )
    log_chunk(
        log,
        "ledger.chunk",
        chunk,
        started,
        phases,
        entries=len(new),
        replayed_whole=len(truth.changed),
        unchanged=len(truth.quiet),
        periods_read=plan.periods_read,
    )
    return LedgerChunkOut(totals_by_kind(new), truth.rejects, truth.exceptions)


def _writer(
    chunk: Chunk,
    entries: pd.DataFrame,
    refunds: pd.DataFrame,
    truth: ChunkTruth,
    month: Month,
    cut: date | None,
    settled: date | None,
    *,
    run: Run,
    last: date,
    written_through: str | None,
    phases: dict[str, float] | None = None,
) -> Callable[[Connection], None]:
    run_id, now = run.run_id, run.now

    def work(conn: Connection) -> None:
        with phase(phases, "write_inputs"):
            sync_inputs(conn, chunk, truth.inputs, truth.changed, cut, settled, last)
        with phase(phases, "write_entries"):
            if len(entries):
                rows = entries.assign(run_id=run_id, recorded_at=now)
                bulk_insert(conn, credit_entries, rows, date_columns=["day"])
            if len(refunds):
                bulk_insert(
                    conn, credit_refunds, refunds.assign(run_id=run_id, written_at=now), date_columns=["day"]
                )
        with phase(phases, "write_lots"):
            written, lots_changed = sync_lots(conn, chunk, truth.lots, settled, last, run_id=run_id, now=now)
        run.count("lots_written", written)
        with phase(phases, "write_balances"):
            sync_balances(conn, chunk, truth.balances, month, run_id=run_id)
        with phase(phases, "write_states"):
            sync_lot_states(conn, chunk, entries, lots_changed, month, last, written_through, run_id=run_id)

    return work


def _period_writer(month: Month, rejects: pd.DataFrame, *, run: Run) -> Callable[[Connection], None]:
    """The ledger write's last transaction: it publishes every entry written so far (this
    run's, and those of a run killed before it finished), stamping the month's period
    with the latest `recorded_at` (readers show entries up to the latest stamp, see
    `credit_reads.published_entries`)."""
    # Every top-up and refund request up to the month's end was validated (of the known
    # accounts in chunks, of unknown accounts beside them): the month's rejects of these
    # tables that were not found again are gone.
    examined = Examined(
        str(month), frozenset({top_ups.name, refund_requests.name}), f"{month}: top-ups and refund requests"
    )
    found = (
        set(zip(rejects["source_table"], rejects["source_id"], rejects["reason"], strict=True))
        if len(rejects)
        else set()
    )

    def work(conn: Connection) -> None:
        if not rejects.empty:
            run.count("rejects_new", record_rejects(conn, rejects, run_id=run.run_id, now=run.now))
        closed = close_unfound(conn, examined, found, job="credits ledger", run_id=run.run_id, now=run.now)
        run.count("rejects_closed", closed)
        publish_period(conn, month, run_id=run.run_id, now=run.now)

    return work
