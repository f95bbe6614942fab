"""Reconcile: does a closed month still agree with its source data and its stored charges?

Late data after a close (usage rows arriving late, back-dated lifecycle events)
changes what a month should have cost; nothing else would notice until someone
re-runs `month-end`. For each closed month, per chunk of accounts, the charges'
pipeline (`jobs.pipeline`, `ChunkJob.reconcile`) reads in one snapshot of the database:

- the chunk's sources, recomputed by `compute_chunk` exactly as `month-end` does;
- the sum of the month's finalized invoice lines (regular and adjustments);
- the sum of the month's stored charges (`charge_periods`: a run for its days, a month form its totals);

and compares (`rules.reconcile.differences`) the invoices with the recomputed
lines (what a re-close would write as adjustments) and with the stored charges.

A month whose credits ledger is written is also checked per chunk of accounts
(`ledger_check_chunk`): its entries (corrections written later included) against
the rules replayed on the source data from the balances written at the end of the
month before (`credits.md`, Ledger periods), per (account, lot, kind). A
difference there is corrected by `month-end --month <latest> --ledger-from M`.

It writes nothing but its findings: one row per month in `month_reconciles`, in
one short transaction at the end. It holds its own lock (`billing-reconcile`,
so two reconciles do not run at once), never the writer lock: it neither waits
for a close nor makes one wait.

A close of the month running at the same time: each chunk reads one snapshot,
in which a chunk's drafts and its corrected charges appear together (they
are written in one transaction). A month is taken as checked only when its
`month_closes` row is the same after the chunks as before (no close finalized
meanwhile) and no chunk saw drafts of a close still running (a live writer
lease). A month whose close ended during the check is checked again (up to
`ATTEMPTS` times); one whose close is still running is reported `busy` (exit
75), never as differences that are only a close half-way. Drafts with no live
writer are left by a close that died: they are not invoices, and are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from functools import partial
from typing import Any

from sqlalchemy import Connection, Engine, select

from billing_jobs.db.billing_tables import (
    month_closes,
    month_reconciles,
)
from billing_jobs.db.credit_reads import (
    credit_sources_exist,
    ledger_accounts,
    ledger_exists,
    read_code_redemptions,
    read_written_entries,
    written_periods,
)
from billing_jobs.db.engine import snapshot
from billing_jobs.db.lock import WRITER_LOCK, read_holders
from billing_jobs.db.reads import plan_chunks
from billing_jobs.db.reconcile_log import BUSY, DIFFERS, OK
from billing_jobs.db.sql import Chunk
from billing_jobs.frames import pd
from billing_jobs.jobs.ledger import account_chunks, compute_chunk_ledger
from billing_jobs.jobs.month_end import month_accounts
from billing_jobs.jobs.pipeline import ChunkJob, run_chunk
from billing_jobs.jobs.runner import Run
from billing_jobs.jobs.workers import run_chunks
from billing_jobs.logs import get_logger
from billing_jobs.rules.calendar import Month, local_midnight_utc
from billing_jobs.rules.reconcile import (
    empty_differences,
    empty_ledger_differences,
    ledger_differences,
)
from billing_jobs.rules.top_ups import decide_codes

RECONCILE_LOCK = "billing-reconcile"
ATTEMPTS = 3
log = get_logger()


class MonthNotClosed(ValueError):
    """A month asked for by name has not been closed: there is nothing to reconcile."""


@dataclass(frozen=True)
class MonthCheck:
    """What reconciling one month found."""

    month: Month
    status: str  # ok | differs | busy
    recomputed: pd.DataFrame  # rules.reconcile.COLUMNS: invoices vs the source data now
    stored: pd.DataFrame  # rules.reconcile.COLUMNS: invoices vs the stored charges
    accounts: int
    # rules.reconcile.LEDGER_COLUMNS: the written ledger vs the rules from the balances
    # written at the end of the month before
    ledger: pd.DataFrame = field(default_factory=empty_ledger_differences)
    latest_period: str | None = None  # the latest written ledger period (for the fix)

    @property
    def differences(self) -> int:
        return len(self.recomputed) + len(self.stored) + len(self.ledger)

    @property
    def difference_units(self) -> int:
        """The sum of the absolute differences of the three checks."""
        frames = (self.recomputed, self.stored, self.ledger)
        return sum(int(f["difference_units"].abs().sum()) for f in frames if len(f))


def closed_months(conn: Connection) -> list[Month]:
    return sorted(Month.parse(p) for (p,) in conn.execute(select(month_closes.c.period)))


def months_to_reconcile(
    engine: Engine, *, month: Month | None = None, since: Month | None = None, last: int = 0
) -> list[Month]:
    """`month` (which must be closed), every closed month from `since` on, or else the
    `last` closed months (none when 0)."""
    with engine.connect() as conn:
        closed = closed_months(conn)
    if month is not None:
        if month not in closed:
            raise MonthNotClosed(
                f"month {month} is not closed: close it first (billing-jobs month-end --month {month})"
            )
        return [month]
    if since is not None:
        return [m for m in closed if m >= since]
    return closed[-last:] if last > 0 else []


def reconcile(
    run: Run, months: Sequence[Month], projects_per_chunk: int, workers: int = 1
) -> list[MonthCheck]:
    """Check each month, then record what was found (one short transaction)."""
    checks = []
    for step, month in enumerate(months, start=1):
        check = reconcile_month(run, month, projects_per_chunk, workers)
        checks.append(check)
        run.progress(step, len(months), str(month))
        (log.info if check.status == OK else log.warning)(
            "reconcile.month",
            period=str(month),
            status=check.status,
            differences=check.differences,
            difference_units=check.difference_units,
            recomputed=len(check.recomputed),
            stored=len(check.stored),
        )
    run.counts.update(
        months=len(checks),
        months_differ=sum(c.status == DIFFERS for c in checks),
        months_busy=sum(c.status == BUSY for c in checks),
        differences=sum(c.differences for c in checks),
        difference_units=sum(c.difference_units for c in checks),
    )
    if checks:
        run.write(partial(_record, run=run, checks=checks))
    return checks


def reconcile_month(run: Run, month: Month, projects_per_chunk: int, workers: int = 1) -> MonthCheck:
    accounts = 0
    for attempt in range(ATTEMPTS):
        with run.engine.connect() as conn:
            before = _close_state(conn, month)
            chunks = plan_chunks(conn, projects_per_chunk, also=month_accounts(month))
        parts = list(run_chunks(run, run_chunk, chunks, workers, job=ChunkJob.reconcile(month)))
        accounts = sum(len(c.accounts or ()) for c in chunks)
        drafts = sum(p.drafts for p in parts)
        with run.engine.connect() as conn:
            moved = _close_state(conn, month) != before
            closing = drafts > 0 and _writer_busy(conn, run)
        if not moved and not closing:
            recomputed = _concat([p.recomputed for p in parts if p.recomputed is not None])
            stored = _concat([p.stored for p in parts if p.stored is not None])
            ledger, latest = check_ledger(run, month, workers)
            status = DIFFERS if len(recomputed) or len(stored) or len(ledger) else OK
            return MonthCheck(month, status, recomputed, stored, accounts, ledger, latest)
        log.warning(
            "reconcile.month_closing",
            period=str(month),
            attempt=attempt + 1,
            detail="a close of this month ended meanwhile" if moved else "a close of this month is running",
        )
        if not moved:
            break  # a close takes longer than a check: the next reconcile tries again
    return MonthCheck(month, BUSY, empty_differences(), empty_differences(), accounts)


@dataclass(frozen=True)
class LedgerCheck:
    """What every chunk of a month's ledger check shares (picklable)."""

    month: Month
    settled: date | None  # the month before's last day; None: replayed from the start
    codes: pd.DataFrame
    decisions: dict[str, str | None]


def check_ledger(run: Run, month: Month, workers: int = 1) -> tuple[pd.DataFrame, str | None]:
    """The month's written ledger against the rules replayed from the balances written at
    the end of the month before, per chunk of accounts on `workers` processes. Returns
    the differences and the latest written period (None, and no differences, when the
    month's ledger is not written)."""
    with run.engine.connect() as conn:
        if not (credit_sources_exist(conn) and ledger_exists(conn)):
            return empty_ledger_differences(), None
        periods = written_periods(conn)
        if str(month) not in periods:
            return empty_ledger_differences(), periods[-1] if periods else None
        zone = run.settings.zone
        end = local_midnight_utc(month.last_day + timedelta(days=1), zone)
        first = min(Month.of(run.settings.effective_from), Month.parse(periods[0]))
        settled = month.previous().last_day if month > first else None
        start = local_midnight_utc(month.first_day, zone) if settled else None
        codes = read_code_redemptions(conn, end, start)
        ids = ledger_accounts(conn)
    plan = LedgerCheck(month, settled, codes, decide_codes(codes))
    chunks = account_chunks(ids, workers)
    found = [f for f in run_chunks(run, ledger_check_chunk, chunks, workers, plan=plan) if len(f)]
    out = pd.concat(found, ignore_index=True) if found else empty_ledger_differences()
    return out, periods[-1]


def ledger_check_chunk(run: Run, chunk: Chunk, *, plan: LedgerCheck) -> pd.DataFrame:
    """One chunk of the ledger check: read (one snapshot) -> replay -> compare."""
    last = plan.month.last_day
    with snapshot(run.engine) as conn:
        truth = compute_chunk_ledger(
            conn,
            run.settings,
            chunk,
            last,
            codes=plan.codes,
            code_decisions=plan.decisions,
            settled=plan.settled,
        )
        written = read_written_entries(conn, chunk, last, settled=plan.settled)
    return ledger_differences(written, truth.entries)


def _close_state(conn: Connection, month: Month) -> tuple[Any, ...] | None:
    mc = month_closes.c
    row = conn.execute(select(mc.last_run_id, mc.adjustments).where(mc.period == str(month))).first()
    return None if row is None else tuple(row)


def _writer_busy(conn: Connection, run: Run) -> bool:
    """Whether a writer lock (a close, possibly of this month) is held by a live run."""
    return any(h.alive and h.name.startswith(WRITER_LOCK) for h in read_holders(conn))


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    found = [f for f in frames if len(f)]
    return pd.concat(found, ignore_index=True) if found else empty_differences()


def _record(conn: Connection, *, run: Run, checks: Sequence[MonthCheck]) -> None:
    conn.execute(
        month_reconciles.insert(),
        [
            {
                "period": str(c.month),
                "run_id": run.run_id,
                "checked_at": run.now,
                "status": c.status,
                "differences": c.differences,
                "difference_units": c.difference_units,
                "recomputed_differences": len(c.recomputed),
                "stored_differences": len(c.stored),
            }
            for c in checks
        ],
    )
