"""Nightly: charge billing days as they close.

For each month touched, one pass per chunk of accounts (the charges' pipeline,
`jobs.pipeline`, `ChunkJob.nightly`) computes the month from
its first day (the cap counts from day one) and makes the charges of the days
being billed equal to what the rules give; days already billed with unchanged
source data are left untouched. The storage fee is stored through the last day
before the next billed one (the month's end, usually) as the lifecycle known now
gives it: a night on which no project's storage fee changes from what was stored
writes no storage row.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta
from functools import partial
from itertools import groupby

from sqlalchemy import Connection, Engine, inspect, select

from billing_jobs.db.billing_tables import billed_days, charge_periods
from billing_jobs.db.reads import accounts_charged, plan_chunks
from billing_jobs.db.reject_log import close_unfound
from billing_jobs.db.source_tables import cloud_usage, compute_usage, project_events
from billing_jobs.db.writes import (
    Window,
    analyze,
    charges_stored,
    insert_ignore,
    mark_charged,
    record_rejects,
)
from billing_jobs.frames import pd
from billing_jobs.jobs.compute import InBackground, platform_rejects
from billing_jobs.jobs.pipeline import ChunkJob, run_chunk
from billing_jobs.jobs.runner import Run
from billing_jobs.jobs.workers import run_chunks, warm_up
from billing_jobs.rules.calendar import Month
from billing_jobs.rules.rejects import Examined

PROJECTS_PER_CHUNK = 10_000


@dataclass(frozen=True)
class NightlyPreview:
    days: list[date]
    charges: pd.DataFrame  # account_id, project_id, charge_type, day, quantity_units, amount_units
    rejects: pd.DataFrame


def days_to_bill(engine: Engine, effective_from: date, yesterday: date) -> list[date]:
    """Every day from the effective date to yesterday not billed yet."""
    if yesterday < effective_from:
        return []
    with engine.connect() as conn:
        done = {
            d if isinstance(d, date) else date.fromisoformat(str(d))
            for (d,) in conn.execute(
                select(billed_days.c.billing_day).where(billed_days.c.billing_day >= effective_from)
            )
        }
    span = (yesterday - effective_from).days + 1
    return [d for d in (effective_from + timedelta(days=i) for i in range(span)) if d not in done]


def days_to_bill_fresh(effective_from: date, yesterday: date) -> list[date]:
    """Days to bill on a database whose billing tables do not exist yet (dry runs)."""
    span = (yesterday - effective_from).days + 1
    return [effective_from + timedelta(days=i) for i in range(max(span, 0))]


def _month_runs(days: Iterable[date]) -> list[tuple[Month, date, date]]:
    """Group days by month: (month, first, last); days in between are billed too."""
    out = []
    for month, group in groupby(sorted(days), key=Month.of):
        items = list(group)
        out.append((month, items[0], items[-1]))
    return out


def billed_after(conn: Connection, days: list[date]) -> set[date]:
    """The billed days after the first of `days`, in the months of `days`."""
    bd = billed_days.c
    start = min(days)
    end = Month.of(max(days)).last_day
    return {
        d if isinstance(d, date) else date.fromisoformat(str(d))
        for (d,) in conn.execute(select(bd.billing_day).where(bd.billing_day > start, bd.billing_day <= end))
    }


def storage_through(month: Month, last: date, billed: set[date]) -> date:
    """The last day the storage fee is stored through after billing days ..last: the
    month's end, or the day before the next day already billed (a re-run of an earlier
    day leaves the storage fee of the days billed after it as it is)."""
    later = [d for d in billed if last < d <= month.last_day]
    return min(later) - timedelta(days=1) if later else month.last_day


def _keep_rejects(
    conn: Connection, *, run: Run, found: pd.DataFrame, examined: Examined | None = None
) -> None:
    """Record the rejects found; with `examined`, close the open ones of it not found again."""
    run.count("rejects_new", record_rejects(conn, found, run_id=run.run_id, now=run.now))
    if examined is not None:
        closed = close_unfound(
            conn, examined, run.reject_keys(), job="nightly", run_id=run.run_id, now=run.now
        )
        run.count("rejects_closed", closed)


def examined_by_nightly(month: Month, first: date, last: date) -> Examined:
    """What nightly re-examined of `month` billing days first..last: the events of every
    project, whatever their day (each project's lifecycle is replayed from its first
    event; events of projects that do not exist are scanned too), and only when the
    days are the whole month, its usage rows. A reject records its month, not its day,
    so usage rejects of a month billed day by day are closed by its month-end."""
    tables = {project_events.name}
    what = f"{month}: events"
    if first == month.first_day and last == month.last_day:
        tables |= {compute_usage.name, cloud_usage.name}
        what = f"{month}: whole month"
    return Examined(str(month), frozenset(tables), what)


def _analyze(conn: Connection, *, changed: int) -> None:
    analyze(conn, charge_periods, changed=changed)


def _mark_month(conn: Connection, *, run: Run, month: Month) -> None:
    mark_charged(conn, month, run_id=run.run_id, now=run.now)


def _mark_billed(conn: Connection, *, run: Run, records: list[dict[str, object]]) -> None:
    run.count("days_billed", insert_ignore(conn, billed_days, records))


def bill_days(
    run: Run, days: list[date], projects_per_chunk: int = PROJECTS_PER_CHUNK, workers: int = 1
) -> NightlyPreview:
    """Charge `days`; in a dry run, return what would be charged instead."""
    settings = run.settings
    preview_charges: list[pd.DataFrame] = []
    preview_rejects: list[pd.DataFrame] = []
    months = _month_runs(days)
    warm_up(run, workers)
    with run.engine.connect() as conn:
        # Accounts with charges on these days are planned even if no project of theirs is left.
        also = []
        if days and (not run.dry_run or inspect(conn).has_table(charge_periods.name)):
            also.append(accounts_charged(min(days), max(days)))
        chunks = plan_chunks(conn, projects_per_chunk, also=also)
        billed = billed_after(conn, days) if days and not run.dry_run else set()
    total_steps = len(months) * len(chunks)
    step = 0
    for month, first, last in months:
        month_rejects: list[pd.DataFrame] = []
        side_read = partial(platform_rejects, settings=settings, first=first, last=last)
        with InBackground(run.engine, side_read) as side:
            window = Window.days(first, last, storage_through(month, last, billed))
            stored = True
            if not run.dry_run:
                # The month marked before any chunk writes a period of it; one that held
                # none as the run started has none to look up.
                with run.engine.connect() as conn:
                    stored = charges_stored(conn, month)
                run.write(partial(_mark_month, run=run, month=month))
            job = ChunkJob.nightly(month, window, stored=stored)
            for out in run_chunks(run, run_chunk, chunks, workers, job=job):
                if out.charges is not None:  # a dry run's charges
                    preview_charges.append(out.charges)
                    month_rejects.append(out.rejects)
                step += 1
                run.progress(step, total_steps, f"{month} {first:%d}..{last:%d}")
            found = side.result()
        run.saw_rejects(found)
        if run.dry_run:
            preview_rejects.extend([found, *month_rejects])
        else:
            examined = examined_by_nightly(month, first, last)
            run.write(partial(_keep_rejects, run=run, found=found, examined=examined))
        if not run.dry_run:
            span = [first + timedelta(days=i) for i in range((last - first).days + 1)]
            records = [{"billing_day": d, "run_id": run.run_id, "billed_at": run.now} for d in span]

            run.write(partial(_mark_billed, run=run, records=records))
    changed = run.counts.get("rows_inserted", 0) + run.counts.get("rows_deleted", 0)
    if not run.dry_run and changed:
        run.write(partial(_analyze, changed=changed))
    run.counts.setdefault("days_billed", 0)
    for key in ("storage_charges", "storage_units", "cloud_charges", "cloud_units", "rejects"):
        run.counts.setdefault(key, 0)
    charges = pd.concat(preview_charges, ignore_index=True) if preview_charges else pd.DataFrame()
    rejects = pd.concat(preview_rejects, ignore_index=True) if preview_rejects else pd.DataFrame()
    return NightlyPreview(days=list(days), charges=charges, rejects=rejects)
