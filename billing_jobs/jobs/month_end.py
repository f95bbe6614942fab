"""Month-end: recompute the month from the source tables and close it.

1. Drafts left by an interrupted run of this month are removed.
2. Per chunk of accounts, the charges' pipeline (`jobs.pipeline`, `ChunkJob.month_end`):
   read the chunk's sources and finalized invoice lines -> rules -> exact diff -> write, in its own
   transaction: stored charges made equal to the recomputed ones day by day, the
   month's lines compared with what the month's finalized invoices already hold,
   and written as draft `regular` invoices (first close) or draft `adjustment`
   invoices holding exactly the differences (re-close).
3. One last transaction finalizes every draft of the month and records the close.

A crash anywhere leaves either the previous state or drafts that the next run
removes; the finalized invoices are never changed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import date
from functools import partial
from typing import Any

from sqlalchemy import BigInteger, Connection, Select, cast, delete, func, select, update

from billing_jobs.db.billing_tables import (
    billed_days,
    charge_periods,
    invoice_lines,
    invoices,
    month_closes,
    month_holds,
    month_shards,
)
from billing_jobs.db.invoices import delete_drafts
from billing_jobs.db.reads import Shard, accounts_charged, plan_chunks
from billing_jobs.db.reject_log import close_unfound
from billing_jobs.db.source_tables import cloud_usage, compute_usage, project_events
from billing_jobs.db.sql import Chunk
from billing_jobs.db.writes import (
    analyze,
    charges_stored,
    insert_ignore,
    mark_charged,
    record_rejects,
)
from billing_jobs.frames import pd
from billing_jobs.jobs import month_controls as controls
from billing_jobs.jobs.compute import (
    MonthRejects,
    month_days,
)
from billing_jobs.jobs.ledger import KnownCompute, LedgerOutcome, write_ledger
from billing_jobs.jobs.numbering import check_numbered, number_drafts
from billing_jobs.jobs.pipeline import ChunkJob, run_chunk
from billing_jobs.jobs.runner import Run
from billing_jobs.jobs.workers import run_chunks, warm_up
from billing_jobs.logs import get_logger
from billing_jobs.rules.calendar import Month
from billing_jobs.rules.invoice import ADJUSTMENT, REGULAR
from billing_jobs.rules.rejects import Examined

PROJECTS_PER_CHUNK = 10_000
log = get_logger()


@dataclass(frozen=True)
class MonthPreview:
    """What a month-end run writes (or would write): invoice headers and lines."""

    month: Month
    kind: str  # regular | adjustment
    closed_before: bool
    invoices: pd.DataFrame  # invoice_id, account_id, kind, sequence, total_units, line_count
    # invoice_id, account_id, project_id, line_type, quantity_units, unit_price, amount_units
    lines: pd.DataFrame
    rejects: pd.DataFrame
    through: date | None = None  # a preview of a month not ended: its days up to this one
    note: str = ""  # what a shard run or --finalize did, instead of "closed"
    ledger: LedgerOutcome | None = None  # the credits ledger written (or previewed)


def is_closed(conn: Connection, month: Month) -> bool:
    row = conn.execute(select(month_closes.c.period).where(month_closes.c.period == str(month)))
    return row.first() is not None


def month_accounts(month: Month) -> list[Select[Any]]:
    """Accounts with charges or invoices of the month: planned even if no project of
    theirs is left, so that what they were charged is corrected (or checked) too."""
    return [
        select(invoices.c.account_id).where(invoices.c.period == str(month)).distinct(),
        accounts_charged(month.first_day, month.last_day),
    ]


def close_month(
    run: Run,
    month: Month,
    projects_per_chunk: int = PROJECTS_PER_CHUNK,
    *,
    fresh_schema: bool = False,
    through: date | None = None,
    workers: int = 1,
    shard: Shard | None = None,
    hold: bool = False,
    confirm: bool = True,
    ledger: bool = True,
    ledger_from: Month | None = None,
) -> MonthPreview:
    """Close `month` (or, in a dry run, compute what closing it would write).

    workers: chunks run on this many processes (see `jobs.workers`).
    shard: only this shard of the accounts; its drafts wait for `finalize_shards`.
    fresh_schema: the jobs' tables do not exist yet (a dry run on a new database).
    through: preview of a month that has not ended: its days up to this one only.
    hold: write the drafts and keep them for `approve_month` (no finalizing, no ledger).
    confirm: False checks a re-close's adjustments against the allowed share of the
        month first (a dry pass) and raises `NeedsConfirm`, writing nothing, beyond it.
    ledger: False leaves the credits ledger out (a dry pass that only compares invoices).
    ledger_from: the ledger looks for late data back to this period (default: `[ledger]
        late_data_months` periods before the month).
    """
    if through is not None and not run.dry_run:
        raise ValueError("only a dry run may stop before the end of the month")
    settings = run.settings
    last = month.last_day if through is None else min(through, month.last_day)
    warm_up(run, workers)
    # A run of every chunk, through the month's end, finds the month's bad usage rows
    # from what its chunks read; a shard or a preview, beside its chunks.
    with MonthRejects(run.engine, settings, month, tallied=shard is None and through is None) as side:
        with run.engine.connect() as conn:
            closed = False if fresh_schema else is_closed(conn, month)
            # A month without stored periods when the run starts (its first close, no
            # night billed) has none for the chunks to look up.
            stored = not fresh_schema and charges_stored(conn, month)
            also = [] if fresh_schema else month_accounts(month)
            chunks = plan_chunks(conn, projects_per_chunk, shard, also=also)
        kind = ADJUSTMENT if closed else REGULAR
        all_heads: list[pd.DataFrame] = []
        all_lines: list[pd.DataFrame] = []
        all_rejects: list[pd.DataFrame] = []

        if (
            closed
            and not confirm
            and not run.dry_run
            and shard is None
            and settings.adjustment_confirm_share is not None
        ):
            _check_share(run, month, projects_per_chunk, workers)
        if not run.dry_run:
            run.write(partial(_start, run=run, month=month, shard=shard, kind=kind))

        job = ChunkJob.month_end(month, kind, last=last, stored=stored)
        compute_days: list[pd.DataFrame] = []
        for step, out in enumerate(run_chunks(run, run_chunk, chunks, workers, job=job), start=1):
            all_rejects.append(out.rejects)
            assert out.compute is not None, "a month-end chunk reads the month's compute"
            side.add(out.tally)
            compute_days.append(out.compute)
            if out.heads is not None and out.lines is not None:  # a dry run's drafts
                all_heads.append(out.heads)
                all_lines.append(out.lines)
            run.progress(step, len(chunks), str(month))
        found = side.result()
    run.saw_rejects(found)
    all_rejects.insert(0, found)

    if not run.dry_run:
        examined = examined_by_month_end(month, chunks, shard)
        _last_writes(
            run, month, shard=shard, hold=hold, closed=closed, kind=kind, found=found, examined=examined
        )
    written = None
    if shard is None and ledger and not (hold and not run.dry_run):
        heads_now = pd.concat(all_heads, ignore_index=True) if all_heads else pd.DataFrame()
        # The chunks read the month's compute once, for every account with projects:
        # the ledger takes its compute per account and day from that read.
        known = KnownCompute.of_parts(month.first_day, month.last_day, compute_days)
        compute_days.clear()
        written = credits_ledger(
            run,
            month,
            heads=heads_now if run.dry_run else None,
            through=through,
            workers=workers,
            ledger_from=ledger_from,
            known=known,
        )
    for key in ("invoices", "invoice_lines", "refunds", "refund_units", "storage_charges", "cloud_charges"):
        run.counts.setdefault(key, 0)
    heads = pd.concat(all_heads, ignore_index=True) if all_heads else pd.DataFrame()
    lines = pd.concat(all_lines, ignore_index=True) if all_lines else pd.DataFrame()
    note = ""
    if shard is not None and not run.dry_run:
        note = f"shard {shard} drafts written; then: month-end --month {month} --finalize"
    elif hold and not run.dry_run:
        note = f"drafts held for approval; then: month-end --approve {month}"
    return MonthPreview(
        month,
        kind,
        closed,
        heads,
        lines,
        pd.concat(all_rejects, ignore_index=True),
        through=through,
        note=note,
        ledger=written,
    )


def _last_writes(
    run: Run,
    month: Month,
    *,
    shard: Shard | None,
    hold: bool,
    closed: bool,
    kind: str,
    found: pd.DataFrame,
    examined: Examined,
) -> None:
    """After the chunks: the shard completed, the drafts held, or the month finalized
    (each with the rejects the run found, and those it no longer found closed)."""
    if shard is not None:
        run.write(partial(_shard_done, run=run, month=month, shard=shard, found=found, examined=examined))
    elif hold:
        run.write(partial(_hold, run=run, month=month, kind=kind, found=found, examined=examined))
    else:
        finalize = partial(_finalize, run=run, month=month, closed=closed, drafts=None)
        run.write(partial(finalize, found=found, examined=examined))
    if run.counts.get("rows_inserted") or run.counts.get("invoice_lines"):
        run.write(partial(_analyze, run=run))


def _dry(run: Run) -> Run:
    """The same run computing only: no lock needed, nothing written, its own counts."""
    return replace(run, dry_run=True, lease=None, counts={}, _reject_keys=set())


def _check_share(run: Run, month: Month, projects_per_chunk: int, workers: int) -> None:
    """A dry pass of the re-close: `NeedsConfirm` when its adjustments move more than
    `[monitoring] adjustment_confirm_share` of the month's invoiced total."""
    preview = close_month(_dry(run), month, projects_per_chunk, workers=workers, ledger=False)
    changed = int(preview.lines["amount_units"].abs().sum()) if len(preview.lines) else 0
    with run.engine.connect() as conn:
        total = controls.invoiced_total(conn, month)
    share = run.settings.adjustment_confirm_share
    assert share is not None, "checked only when a share is set"
    run.counts["adjustment_units_moved"] = changed
    if changed and controls.exceeds_share(changed, total, share):
        raise controls.NeedsConfirm(month, changed, total, share, preview)


def _hold(
    conn: Connection, *, run: Run, month: Month, kind: str, found: pd.DataFrame, examined: Examined
) -> None:
    """A held close's last write: the platform's rejects recorded, the drafts held."""
    run.count("rejects_new", record_rejects(conn, found, run_id=run.run_id, now=run.now))
    _close_unfound(conn, run=run, examined=examined)
    inv = invoices.c
    mine = [inv.period == str(month), inv.status == "draft", inv.run_id == run.run_id]
    count, total = conn.execute(
        select(func.count(), cast(func.coalesce(func.sum(inv.total_units), 0), BigInteger)).where(*mine)
    ).one()
    conn.execute(delete(month_holds).where(month_holds.c.period == str(month)))
    conn.execute(
        month_holds.insert().values(
            period=str(month),
            run_id=run.run_id,
            kind=kind,
            settings_hash=run.settings.digest(),
            held_at=run.now,
            invoices=int(count),
            total_units=int(total),
        )
    )
    run.counts["held"] = 1


def approve_month(
    run: Run, month: Month, projects_per_chunk: int, *, workers: int = 1, ledger_from: Month | None = None
) -> MonthPreview:
    """Finalize the held drafts of `month` if they equal a fresh computation of it, then
    write the credits ledger; `ApprovalDiffers` (nothing changed) otherwise.

    A closed month with nothing held was approved (or closed) before: a repeat, or the
    re-run of an approval that died after finalizing, only brings its credits ledger
    up to date (which writes nothing when it is)."""
    with run.engine.connect() as conn:
        hold = controls.held(conn, month)
        closed = is_closed(conn, month)
        drafts = controls.draft_lines(conn, month, hold.run_id) if hold is not None else None
    if hold is None and closed:
        empty = pd.DataFrame()
        written = credits_ledger(run, month, workers=workers, ledger_from=ledger_from)
        note = "nothing held: the month is closed (approved before); its credits ledger is up to date"
        return MonthPreview(month, ADJUSTMENT, True, empty, empty, empty, note=note, ledger=written)
    if hold is None or drafts is None:  # (drafts is None only without a hold)
        raise controls.NothingHeld(
            f"no drafts of {month} are held for approval: run month-end --month {month} --hold first"
        )
    kind = ADJUSTMENT if closed else REGULAR
    fresh = close_month(_dry(run), month, projects_per_chunk, workers=workers, ledger=False)
    # Drafts of a first close cannot be approved as adjustments (or the reverse): all differ.
    differences = controls.line_differences(drafts, fresh.lines if hold.kind == kind else None)
    if not differences.empty or hold.kind != kind:
        raise controls.ApprovalDiffers(month, differences)

    def approve(conn: Connection) -> None:
        run.count("invoices", int(hold.invoices))
        run.count("invoice_lines", len(drafts))
        _finalize(conn, run=run, month=month, closed=closed, drafts=[hold.run_id])

    run.write(approve)
    run.counts["approved_run"] = str(hold.run_id)
    written = credits_ledger(run, month, workers=workers, ledger_from=ledger_from)
    note = f"held drafts of run {hold.run_id} approved: {'adjustments written' if closed else 'closed'}"
    empty = pd.DataFrame()
    return MonthPreview(month, kind, closed, fresh.invoices, fresh.lines, empty, note=note, ledger=written)


def credits_ledger(
    run: Run,
    month: Month,
    *,
    heads: pd.DataFrame | None = None,
    through: date | None = None,
    workers: int = 1,
    ledger_from: Month | None = None,
    known: KnownCompute | None = None,
) -> LedgerOutcome:
    """Write (or in a dry run preview) the credits ledger through the month's end, after
    its invoices. heads: a dry run's previewed invoices (not in the database).
    ledger_from: look for late data back to this period (`write_ledger`). known: the
    month's compute per account and day, read by the month's chunks."""
    started = time.perf_counter()
    extra: dict[tuple[str, str], int] = {}
    if heads is not None and not heads.empty:
        for account, total in zip(heads["account_id"], heads["total_units"], strict=True):
            extra[(account, str(month))] = extra.get((account, str(month)), 0) + int(total)
    per_chunk = int(os.environ.get("BILLING_LEDGER_ACCOUNTS_PER_CHUNK") or 0)  # 0: sized by the run
    outcome = write_ledger(
        run,
        month,
        extra_invoices=extra,
        through=through,
        workers=workers,
        per_chunk=max(per_chunk, 0) or None,
        ledger_from=ledger_from,
        known=known,
    )
    if outcome.skipped:
        log.warning("ledger.skipped", period=str(month), reason=outcome.skipped)
    else:
        log.info(
            "ledger.done",
            period=str(month),
            seconds=round(time.perf_counter() - started, 3),
            dry_run=run.dry_run,
            **outcome.counts,
        )
    return outcome


def _analyze(conn: Connection, *, run: Run) -> None:
    """Statistics refreshed where the run changed a large share of a table."""
    charges = run.counts.get("rows_inserted", 0) + run.counts.get("rows_deleted", 0)
    analyze(conn, charge_periods, changed=charges)
    analyze(conn, invoices, invoice_lines, changed=run.counts.get("invoice_lines", 0))


def _start(conn: Connection, *, run: Run, month: Month, shard: Shard | None, kind: str) -> None:
    """A close's first write: the month marked as one that may hold stored charges
    (before any chunk writes one), drafts of an interrupted run removed.

    A whole run removes every draft of the month; a shard records that it runs (each
    chunk then replaces its own accounts' drafts).
    """
    mark_charged(conn, month, run_id=run.run_id, now=run.now)
    if shard is None:
        delete_drafts(conn, month, None)
        conn.execute(delete(month_holds).where(month_holds.c.period == str(month)))
    else:
        ms = month_shards.c
        key = (ms.period == str(month), ms.shard_count == shard.count, ms.shard_index == shard.index)
        conn.execute(delete(month_shards).where(*key))
        conn.execute(
            month_shards.insert().values(
                period=str(month),
                shard_count=shard.count,
                shard_index=shard.index,
                run_id=run.run_id,
                kind=kind,
                status="running",
                settings_hash=run.settings.digest(prices_only=True),
                started_at=run.now,
            )
        )


def examined_by_month_end(month: Month, chunks: Sequence[Chunk], shard: Shard | None) -> Examined:
    """What a month-end re-examined: every usage row and event of `month`, of the projects
    of its chunks' accounts (a shard: of its accounts only) and of projects that do not
    exist (the platform-wide scans)."""
    tables = frozenset({project_events.name, compute_usage.name, cloud_usage.name})
    if shard is None:
        return Examined(str(month), tables, f"{month}: whole month")
    accounts = frozenset(a for chunk in chunks for a in chunk.accounts or ())
    return Examined(str(month), tables, f"{month}: accounts of shard {shard}", accounts)


def _close_unfound(conn: Connection, *, run: Run, examined: Examined) -> None:
    found = run.reject_keys()
    closed = close_unfound(conn, examined, found, job="month-end", run_id=run.run_id, now=run.now)
    run.count("rejects_closed", closed)


def _shard_done(
    conn: Connection, *, run: Run, month: Month, shard: Shard, found: pd.DataFrame, examined: Examined
) -> None:
    """A shard's last write: the platform's rejects recorded, those it no longer found
    closed, the shard complete."""
    run.count("rejects_new", record_rejects(conn, found, run_id=run.run_id, now=run.now))
    _close_unfound(conn, run=run, examined=examined)
    ms = month_shards.c
    conn.execute(
        update(month_shards)
        .where(
            ms.period == str(month),
            ms.shard_count == shard.count,
            ms.shard_index == shard.index,
            ms.run_id == run.run_id,
        )
        .values(status="complete", finished_at=run.now, invoices=int(run.counts.get("invoices", 0)))
    )


def _finalize(
    conn: Connection,
    *,
    run: Run,
    month: Month,
    closed: bool,
    drafts: Sequence[str] | None,
    found: pd.DataFrame | None = None,
    examined: Examined | None = None,
) -> None:
    """Finalize the month's drafts (of the runs `drafts`, or all), giving each its invoice
    number, and record the close, with the platform's rejects (`found`) that the run met
    beside its chunks, and the rejects of what it re-examined (`examined`) that it no
    longer found closed."""
    if found is not None:
        run.count("rejects_new", record_rejects(conn, found, run_id=run.run_id, now=run.now))
    if examined is not None:
        _close_unfound(conn, run=run, examined=examined)
    inv = invoices.c
    where = [inv.period == str(month), inv.status == "draft"]
    if drafts is not None:
        where.append(inv.run_id.in_(list(drafts)))
    numbered = number_drafts(conn, str(month), *where)  # gapless: rolls back with the rest
    finalized = conn.execute(update(invoices).where(*where).values(status="finalized", finalized_at=run.now))
    written = finalized.rowcount or 0
    check_numbered(numbered, written)
    days = [{"billing_day": d, "run_id": run.run_id, "billed_at": run.now} for d in month_days(month)]
    insert_ignore(conn, billed_days, days)
    conn.execute(delete(month_holds).where(month_holds.c.period == str(month)))
    pin = controls.pin_values(run.settings, month)
    if closed and written:
        conn.execute(
            update(month_closes)
            .where(month_closes.c.period == str(month))
            .values(
                last_run_id=run.run_id,
                last_run_at=run.now,
                adjustments=month_closes.c.adjustments + 1,
                **pin,
            )
        )
    elif closed:
        # Nothing to adjust: only the settings it was (re)billed with are recorded.
        conn.execute(update(month_closes).where(month_closes.c.period == str(month)).values(**pin))
    else:
        conn.execute(
            month_closes.insert().values(
                period=str(month),
                closed_at=run.now,
                close_run_id=run.run_id,
                last_run_id=run.run_id,
                last_run_at=run.now,
                adjustments=0,
                **pin,
            )
        )


class ShardsIncomplete(RuntimeError):
    """`--finalize` found a shard missing, failed or inconsistent: nothing was finalized."""


def finalize_shards(run: Run, month: Month, *, ledger_from: Month | None = None) -> MonthPreview:
    """Finalize a sharded close of `month` once every shard of its split is complete.

    The split is the one of the shard that started last. Every shard 0..N-1 of it
    must have completed, with the same settings as this run and for the month's
    state (first close or re-close); otherwise `ShardsIncomplete` names what is
    missing and nothing changes. Drafts of other runs (an abandoned split) are
    removed. When the month has no shard drafts left to finalize, nothing changes.
    (A shard still running holds its lease, so this run meets `LockHeld` first.)
    """
    ms = month_shards.c
    with run.engine.connect() as conn:
        closed = is_closed(conn, month)
        rows = conn.execute(select(month_shards).where(ms.period == str(month))).all()
    if not rows:
        if closed:
            run.counts.update(invoices=0, invoice_lines=0, shards=0)
            empty = pd.DataFrame()
            return MonthPreview(
                month, ADJUSTMENT, True, empty, empty, empty, note="nothing to finalize: already final"
            )
        raise ShardsIncomplete(
            f"no shard of {month} has run: run month-end --month {month} --shard I/N first"
        )
    latest = max(rows, key=lambda r: r.started_at)
    count = int(latest.shard_count)
    split = {int(r.shard_index): r for r in rows if int(r.shard_count) == count}
    missing = sorted(i for i in range(count) if i not in split or split[i].status != "complete")
    if missing:
        names = ", ".join(f"{i}/{count}" for i in missing)
        raise ShardsIncomplete(
            f"shard(s) {names} of {month} have not completed: run month-end --month {month} "
            f"--shard I/{count} for each, then --finalize"
        )
    kind = ADJUSTMENT if closed else REGULAR
    stale = sorted(f"{i}/{count}" for i, r in split.items() if r.kind != kind)
    if stale:
        raise ShardsIncomplete(
            f"shard(s) {', '.join(stale)} of {month} wrote {'regular' if closed else 'adjustment'} drafts "
            f"but the month is {'closed' if closed else 'open'} now: run them again, then --finalize"
        )
    digest = run.settings.digest(prices_only=True)  # the ledger's look-back is finalize's own
    changed = sorted(f"{i}/{count}" for i, r in split.items() if r.settings_hash != digest)
    if changed:
        raise ShardsIncomplete(
            f"shard(s) {', '.join(changed)} of {month} ran with other settings than this run: "
            "run them again with these settings, then --finalize"
        )
    runs = [str(r.run_id) for r in split.values()]

    def finalize(conn: Connection) -> None:
        run.count("drafts_removed", delete_drafts(conn, month, None, keep_runs=runs))
        inv = invoices.c
        mine = [inv.period == str(month), inv.status == "draft", inv.run_id.in_(runs)]
        run.count("invoices", conn.execute(select(func.count()).where(*mine)).scalar_one())
        lines = select(inv.invoice_id).where(*mine)
        run.count(
            "invoice_lines",
            conn.execute(
                select(func.count()).select_from(invoice_lines).where(invoice_lines.c.invoice_id.in_(lines))
            ).scalar_one(),
        )
        _finalize(conn, run=run, month=month, closed=closed, drafts=runs)
        conn.execute(delete(month_shards).where(ms.period == str(month)))

    run.write(finalize)
    run.counts["shards"] = count
    ledger = credits_ledger(run, month, ledger_from=ledger_from)
    empty = pd.DataFrame()
    note = f"{count} shard(s) finalized: {'adjustments' if closed else 'closed'}"
    return MonthPreview(month, kind, closed, empty, empty, empty, note=note, ledger=ledger)


def month_has_ended(month: Month, today: date) -> bool:
    return month.last_day < today
