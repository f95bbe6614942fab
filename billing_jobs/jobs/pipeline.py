"""The charges' pipeline of one chunk of accounts, declared once (`run_chunk`) and run
by every job that bills: read -> rules -> diff -> write.

A job says what it asks of the pipeline in a `ChunkJob`:

- nightly (`ChunkJob.nightly`): the days billed (the storage fee through the month's
  last day not billed yet); no invoices; the charges' differences written.
- month-end (`ChunkJob.month_end`): the month; drafts, `regular`, or `adjustment` (the
  lines against the finalized ones); the differences and the drafts written.
- reconcile (`ChunkJob.reconcile`): the month; the lines compared with the finalized
  ones, the stored charges with them too; nothing written, the differences returned.

1. **read**, in one connection (reconcile: one snapshot of the database): the chunk's
   sources (`jobs.compute.compute_chunk`'s reads: its projects and events, the usage of
   the days decided, the month's compute when the month is decided whole), and what the
   job compares with: the month's finalized invoice lines and the next sequence per
   account (a re-close, reconcile), the stored charges summed (reconcile).
2. **rules**: the month recomputed (`compute_chunk`, pure rules over what was read), its
   invoice lines as drafts or as adjustments (`rules.invoice`), the
   charges in their canonical periods (`ChunkResult.periods`).
3. **diff**: with what is stored: the exact diff of `db.writes.sync_charges`, inside the
   write transaction (nightly, month-end), or `rules.reconcile.differences` (reconcile).
4. **write**, one transaction (`Run.write`, write point `_write_chunk`): the stored
   charges made equal to the recomputed ones, the rejects recorded, the chunk's drafts
   replaced.

A dry run stops after the rules and returns what it would write. The job modules only
plan the chunks, run this on them (`jobs.workers.run_chunks`) and finalize.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from functools import partial

from sqlalchemy import Connection, Engine

from billing_jobs import logs
from billing_jobs.db.engine import serial_plans, snapshot
from billing_jobs.db.invoices import count_drafts, delete_drafts, invoiced_lines, next_sequences, write_drafts
from billing_jobs.db.reads import stored_charges
from billing_jobs.db.sql import Chunk
from billing_jobs.db.writes import Window, record_rejects, sync_charges
from billing_jobs.frames import pd
from billing_jobs.jobs.compute import ChunkResult, SourceTally, compute_chunk
from billing_jobs.jobs.runner import Run
from billing_jobs.phases import log_chunk, phase, rest
from billing_jobs.rules.calendar import Month, day_number
from billing_jobs.rules.invoice import ADJUSTMENT, REGULAR, adjustment_lines, drafts_for, empty_lines
from billing_jobs.rules.reconcile import charge_lines, differences

CHARGES_LOG = "billing_jobs.charges"


@dataclass(frozen=True)
class ChunkJob:
    """What one job asks of the pipeline, the same for each of its chunks (picklable)."""

    month: Month
    window: Window  # the days decided: the charges of first..last, the storage fee through storage_last
    invoices: str | None = None  # month-end: the drafts' kind (REGULAR, ADJUSTMENT); None: no invoices
    check: bool = False  # reconcile: compare with what is stored and invoiced, write nothing
    stored: bool = True  # the month may hold stored periods (False: the diff looks none up)

    @classmethod
    def nightly(cls, month: Month, window: Window, *, stored: bool = True) -> ChunkJob:
        return cls(month, window, stored=stored)

    @classmethod
    def month_end(cls, month: Month, kind: str, *, last: date | None = None, stored: bool = True) -> ChunkJob:
        """last: a preview of a month not ended stops at this day."""
        assert kind in (REGULAR, ADJUSTMENT), kind
        return cls(month, Window.days(month.first_day, last or month.last_day), invoices=kind, stored=stored)

    @classmethod
    def reconcile(cls, month: Month) -> ChunkJob:
        return cls(month, Window.days(month.first_day, month.last_day), check=True)

    @property
    def whole_month(self) -> bool:
        """Whether the month's totals, waiver and invoice lines are computed."""
        return self.invoices is not None or self.check

    @property
    def compares_invoiced(self) -> bool:
        """Whether the month's finalized invoice lines are read (a re-close, reconcile)."""
        return self.check or self.invoices == ADJUSTMENT


@dataclass
class ChunkOutput:
    """What a chunk gives back to its job (written rows are not carried back)."""

    rejects: pd.DataFrame  # the rows the rules rejected
    compute: pd.DataFrame | None = None  # the month's compute per account and billing day (whole month)
    charges: pd.DataFrame | None = None  # a dry nightly: the daily charges of the days billed
    heads: pd.DataFrame | None = None  # a dry month-end: the draft invoices
    lines: pd.DataFrame | None = None  # ... and their lines
    recomputed: pd.DataFrame | None = None  # reconcile: the invoices against the month recomputed
    stored: pd.DataFrame | None = None  # reconcile: the invoices against the stored charges
    drafts: int = 0  # reconcile: drafts of the month it saw (a close running, or one that died)
    tally: SourceTally | None = None  # a whole month's usage reads: what they saw (`source_rejects`)


@dataclass
class _Held:
    """What the job compares the recomputed month with (read with the sources)."""

    invoiced: pd.DataFrame | None = None
    sequences: dict[str, int] | None = None
    stored: pd.DataFrame | None = None
    drafts: int = 0


def run_chunk(run: Run, chunk: Chunk, *, job: ChunkJob) -> ChunkOutput:
    """The pipeline for one chunk: read -> rules -> diff -> write (see the module)."""
    started = time.perf_counter()
    phases: dict[str, float] = {}
    month, window = job.month, job.window
    with _reading(run.engine, job) as conn:
        result = compute_chunk(
            conn,
            run.settings,
            month,
            chunk,
            first=window.first,
            last=window.last,
            whole_month=job.whole_month,
            storage_last=window.storage_last,
            phases=phases,
        )
        held = _read_held(conn, job, chunk, phases)
    with phase(phases, "rules"):
        lines = _lines(result, held, job)
    if job.check:
        assert lines is not None, "reconcile computes the month's lines"
        assert held.invoiced is not None, "reconcile reads the finalized lines"
        assert held.stored is not None, "reconcile reads the stored charges"
        with phase(phases, "diff"):
            recomputed = differences(held.invoiced, lines)
            stored = differences(charge_lines(held.invoiced), held.stored)
        log_chunk(logs.named(CHARGES_LOG), "charges.chunk", chunk, started, phases)
        return ChunkOutput(result.rejects, recomputed=recomputed, stored=stored, drafts=held.drafts)
    heads = None
    if job.invoices is not None:
        assert lines is not None, "a month-end chunk computes the month's lines"
        with phase(phases, "rules"):
            heads, lines = drafts_for(lines, month, job.invoices, held.sequences or {})
    _count(run, result, heads, lines)
    out = ChunkOutput(result.rejects, compute=result.compute_days, tally=result.tally)
    if run.dry_run:
        log_chunk(logs.named(CHARGES_LOG), "charges.chunk", chunk, started, phases)
        if job.invoices is None:
            charges = result.charges
            out.charges = charges.loc[charges["day"] <= day_number(window.last)]
        out.heads, out.lines = heads, lines
        return out
    with phase(phases, "periods"):
        wanted = result.periods
    with rest(phases, "write"):
        run.write(
            partial(
                _write_chunk,
                run=run,
                job=job,
                result=result,
                wanted=wanted,
                chunk=chunk,
                heads=heads,
                lines=lines,
                phases=phases,
            )
        )
    log_chunk(logs.named(CHARGES_LOG), "charges.chunk", chunk, started, phases)
    return out


@contextmanager
def _reading(engine: Engine, job: ChunkJob) -> Iterator[Connection]:
    """The read step's connection, its statements planned without parallel workers
    (`serial_plans`): reconcile's sees one committed state throughout."""
    with snapshot(engine) if job.check else engine.connect() as conn:
        serial_plans(conn)
        yield conn


def _read_held(conn: Connection, job: ChunkJob, chunk: Chunk, phases: dict[str, float]) -> _Held:
    """What the job compares with, read on the sources' connection (nothing for nightly)."""
    held = _Held()
    if not job.whole_month:
        return held
    with phase(phases, "invoiced_read"):
        if job.compares_invoiced:
            held.invoiced = invoiced_lines(conn, job.month, chunk)
        if job.invoices == ADJUSTMENT:
            held.sequences = next_sequences(conn, job.month, chunk)
        if job.check:
            held.stored = stored_charges(conn, job.month, chunk)
            held.drafts = count_drafts(conn, job.month, chunk)
    return held


def _lines(result: ChunkResult, held: _Held, job: ChunkJob) -> pd.DataFrame | None:
    """The month's invoice lines a job writes or compares: all of them (a first close,
    reconcile), or what they differ by from the finalized ones (a re-close's adjustments)."""
    if not job.whole_month:
        return None
    truth = result.lines if result.lines is not None else empty_lines()
    if job.invoices == ADJUSTMENT:
        assert held.invoiced is not None, "a re-close reads the finalized lines"
        return adjustment_lines(truth, held.invoiced)
    return truth


def _count(run: Run, result: ChunkResult, heads: pd.DataFrame | None, lines: pd.DataFrame | None) -> None:
    """The run summary's counts of the chunk (what is charged and rejected; the invoices)."""
    for name, value in result.counts().items():
        run.count(name, value)
    run.saw_rejects(result.rejects)
    if result.refunds is not None:
        refunds = result.refunds
        run.count("refunds", len(refunds))
        run.count("refund_units", int(refunds["amount_units"].sum()) if len(refunds) else 0)
    if heads is not None and lines is not None:
        run.count("invoices", len(heads))
        run.count("invoice_lines", len(lines))


def _write_chunk(
    conn: Connection,
    *,
    run: Run,
    job: ChunkJob,
    result: ChunkResult,
    wanted: pd.DataFrame,
    chunk: Chunk,
    heads: pd.DataFrame | None,
    lines: pd.DataFrame | None,
    phases: dict[str, float] | None = None,
) -> None:
    """The chunk's one transaction: diff -> write of the stored charges, the rejects
    recorded, and (month-end) its drafts replaced."""
    inserted, deleted = sync_charges(
        conn,
        wanted,
        job.window,
        chunk,
        run_id=run.run_id,
        now=run.now,
        phases=phases,
        stored=job.stored,
    )
    run.count("rows_inserted", inserted)
    run.count("rows_deleted", deleted)
    run.count("rejects_new", record_rejects(conn, result.rejects, run_id=run.run_id, now=run.now))
    if job.invoices is not None:
        assert heads is not None, "a month-end chunk has its drafts"
        assert lines is not None, "a month-end chunk has its drafts' lines"
        delete_drafts(conn, job.month, chunk)  # left by an interrupted run of this chunk's accounts
        write_drafts(conn, heads, lines, job.month, run_id=run.run_id, now=run.now)
