"""Running a job: run record, lock, one summary, one log line.

`run_job` is the frame every writing job runs in. It records the run in
`billing_runs` (command, arguments, period, settings hash, code version, start,
end, status, counts, error), holds the writer lock while the job works, and logs
one summary line. A dry run takes no lock and records nothing: it writes nothing
at all.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, insert, update

from billing_jobs import __version__
from billing_jobs.collector import freeze_long_lived
from billing_jobs.db.billing_tables import billing_runs
from billing_jobs.db.engine import serial_plans
from billing_jobs.db.lock import WRITER_LOCK, Lease, LockHeld
from billing_jobs.faults import Faults, label_of, plan_for
from billing_jobs.frames import pd
from billing_jobs.logs import get_logger
from billing_jobs.redact import scrub
from billing_jobs.settings import Settings

Progress = Callable[[int, int, str], None]


def _no_progress(done: int, total: int, label: str) -> None:
    return None


@dataclass
class Run:
    """What a job body gets: the engine, settings, its id, "now", and a way to commit."""

    engine: Engine
    settings: Settings
    run_id: str
    now: datetime  # naive UTC, captured once
    dry_run: bool
    lease: Lease | None
    counts: dict[str, Any] = field(default_factory=dict)
    progress: Progress = _no_progress
    # Taken around each write transaction when processes share one writer (SQLite workers).
    write_turn: Any = None
    # Fault injection (`billing_jobs.faults`): None unless a BILLING_FAULT_* variable is set.
    faults: Faults | None = None
    _reject_keys: set[tuple[str, str, str]] = field(default_factory=set)

    def count(self, key: str, value: int) -> None:
        self.counts[key] = self.counts.get(key, 0) + int(value)

    def saw_rejects(self, found: pd.DataFrame) -> None:
        """Count rejected source rows once each, however many steps meet them."""
        if len(found):
            self._reject_keys.update(
                zip(found["source_table"], found["source_id"], found["reason"], strict=True)
            )
        self.counts["rejects"] = len(self._reject_keys)

    def reject_keys(self) -> set[tuple[str, str, str]]:
        return set(self._reject_keys)

    def add_reject_keys(self, keys: set[tuple[str, str, str]]) -> None:
        self._reject_keys.update(keys)
        self.counts["rejects"] = len(self._reject_keys)

    def clear_rejects(self) -> None:
        self._reject_keys = set()

    def rejects_by_reason(self) -> dict[str, int]:
        """`table.reason` -> how many rows, for the run's log."""
        return dict(Counter(f"{table}.{reason}" for table, _, reason in self._reject_keys))

    def reject_sample(self, n: int = 10) -> list[str]:
        return [f"{table}:{row_id}:{reason}" for table, row_id, reason in sorted(self._reject_keys)[:n]]

    def write(self, work: Callable[[Connection], None]) -> None:
        """Run `work` in one transaction that also proves the lock is still ours; its
        statements are planned without parallel workers (`serial_plans`), as the reads
        of a chunk are."""
        assert not self.dry_run, "a dry run writes nothing"
        if self.faults is not None:
            self.faults.before_write(label_of(work))
        turn = self.write_turn if self.write_turn is not None else nullcontext()
        with turn, self.engine.begin() as conn:
            if self.lease is not None:
                self.lease.assert_held(conn)
            serial_plans(conn)
            work(conn)
            if self.lease is not None:
                self.lease.before_commit(conn)
            if self.faults is not None:
                self.faults.before_commit(label_of(work))
        if self.faults is not None:
            self.faults.committed(label_of(work))


def _point(faults: Faults | None, label: str, write: Callable[[], Any]) -> Any:
    """One of the run's own write transactions (run record, lease), as a fault point."""
    if faults is None:
        return write()
    faults.before_commit(label)
    result = write()
    faults.committed(label)
    return result


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class Outcome:
    run_id: str
    status: str
    counts: dict[str, Any]
    seconds: float
    result: Any = None


def run_job(
    engine: Engine,
    settings: Settings,
    job: str,
    *,
    period: str,
    arguments: dict[str, Any],
    body: Callable[[Run], Any],
    now: datetime,
    dry_run: bool = False,
    progress: Progress = _no_progress,
    lock_name: str = WRITER_LOCK,
) -> Outcome:
    """Run `body` as job `job`; raises `LockHeld` when another run holds the lock."""
    run_id = str(uuid.uuid4())
    now_naive = now.astimezone(UTC).replace(tzinfo=None) if now.tzinfo else now
    host, pid = socket.gethostname(), os.getpid()
    log = get_logger(job=job, run_id=run_id, period=period, dry_run=dry_run)
    lease = None
    plan = None if dry_run else plan_for(job)
    faults = None if plan is None else Faults(plan)
    if not dry_run:
        lease = Lease(engine, lock_name, run_id, host, pid, settings.lock_lease_seconds)
        _point(
            faults,
            "run.start",
            lambda: _record_start(engine, run_id, job, period, arguments, settings, host, pid, now_naive),
        )
        try:
            _point(faults, "lock.acquire", lambda: lease.acquire(_utcnow()))
        except LockHeld as held:
            message = str(held)
            _point(faults, "run.end", lambda: _record_end(engine, run_id, "locked", {}, message))
            _publish_metrics(engine, settings, job)
            log.warning("run.locked", holder=held.run_id, holder_host=held.host, since=str(held.since))
            raise
    run = Run(engine, settings, run_id, now_naive, dry_run, lease, progress=progress, faults=faults)
    started = time.perf_counter()
    freeze_long_lived()  # the modules the job runs are imported: out of the collector's way
    log.info("run.start", arguments=arguments)
    try:
        result = body(run)
    except BaseException as exc:
        seconds = time.perf_counter() - started
        if not dry_run:
            error = f"{type(exc).__name__}: {exc}"
            _point(faults, "run.end", lambda: _record_end(engine, run_id, "failed", run.counts, error))
            assert lease is not None
            _point(faults, "lock.release", lease.release)
            _publish_metrics(engine, settings, job)
        log.error("run.failed", error=f"{type(exc).__name__}: {exc}", seconds=round(seconds, 3), **run.counts)
        raise
    seconds = time.perf_counter() - started
    if run.counts.get("rejects"):
        log.warning(
            "run.rejects",
            rejects=run.counts["rejects"],
            by_reason=run.rejects_by_reason(),
            sample=run.reject_sample(),
            hint="see billing-jobs rejects",
        )
    if not dry_run:
        _point(faults, "run.end", lambda: _record_end(engine, run_id, "succeeded", run.counts, None))
        assert lease is not None
        _point(faults, "lock.release", lease.release)
        _publish_metrics(engine, settings, job)
    log.info("run.summary", status="succeeded", seconds=round(seconds, 3), **run.counts)
    return Outcome(run_id, "succeeded", dict(run.counts), seconds, result)


def _publish_metrics(engine: Engine, settings: Settings, job: str) -> None:
    """Textfile and Pushgateway metrics after a run that writes (never raises)."""
    from billing_jobs.metrics import publish_after_run

    publish_after_run(engine, settings, job)


def _record_start(
    engine: Engine,
    run_id: str,
    job: str,
    period: str,
    arguments: dict[str, Any],
    settings: Settings,
    host: str,
    pid: int,
    now: datetime,
) -> None:
    with engine.begin() as conn:
        conn.execute(
            insert(billing_runs).values(
                run_id=run_id,
                job=job,
                arguments=scrub(json.dumps(arguments, sort_keys=True, default=str)),
                period=period,
                settings_hash=settings.digest(),
                code_version=__version__,
                host=host,
                pid=pid,
                status="running",
                started_at=_utcnow(),
            )
        )


def _record_end(engine: Engine, run_id: str, status: str, counts: dict[str, Any], error: str | None) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(billing_runs)
            .where(billing_runs.c.run_id == run_id)
            .values(
                status=status,
                finished_at=_utcnow(),
                counts=json.dumps(counts, sort_keys=True),
                error=None if error is None else scrub(error),
            )
        )
