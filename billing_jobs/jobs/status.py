"""What happened: recent runs, and the health of the billing jobs.

Two halves. `read_runs` and `read_facts` load plain facts from the jobs' own
tables (`billing_runs`, `billing_locks`, `billed_days`, `month_closes`,
`rejects`). `decide` turns facts into problems: pure, no database, no clock
("now" is one of the facts), so every rule of the probe is testable in
milliseconds.

The probe's rules (`billing-jobs status` exits 1 when any holds):

- a month that ended more than `close_overdue_days` days ago is not closed;
- the last nightly run failed or was abandoned (its process died holding the
  lock: marked `abandoned` by the run that took the lock over, or still
  `running` while its lock is free or held by another run). A later nightly run
  that succeeds clears it: only the latest nightly run counts, so an old
  abandoned run never fails the probe for ever;
- a billing day is not billed by the time the nightly should have billed it:
  day D is due at `nightly_at` on D+1, plus 6 hours of grace, in the billing
  timezone;
- a closed month's latest reconcile found differences (`billing-jobs reconcile`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, Engine, func, inspect, select

from billing_jobs import defaults
from billing_jobs.db.billing_tables import (
    billed_days,
    billing_locks,
    billing_runs,
    month_closes,
    month_holds,
    rejects,
)
from billing_jobs.db.lock import read_holders
from billing_jobs.db.reject_log import count_by_status
from billing_jobs.redact import scrub
from billing_jobs.rules.calendar import Month
from billing_jobs.rules.money import format_units
from billing_jobs.settings import Settings

JOBS = defaults.JOBS
ABANDONED = "abandoned"
RUNNING = "running"
FAILED = "failed"
NIGHTLY_GRACE = timedelta(hours=6)
REQUIRED_TABLES = ("billing_runs", "billing_locks", "billed_days", "month_closes", "rejects")

# Counts worth a column in `runs`, in this order (the JSON has them all).
KEY_COUNTS = (
    "days_billed",
    "storage_charges",
    "cloud_charges",
    "invoices",
    "invoice_lines",
    "refunds",
    "rejects",
    "rejects_new",
)


class TablesMissing(RuntimeError):
    """The jobs' own tables do not exist (the database was never upgraded)."""


# ---------------------------------------------------------------------------
# Facts
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RunInfo:
    """One row of `billing_runs`, with the status as it stands now."""

    run_id: str
    job: str
    period: str
    status: str  # running | succeeded | failed | locked | abandoned
    recorded_status: str
    started_at: datetime  # naive UTC
    finished_at: datetime | None
    counts: dict[str, Any]
    error: str | None
    host: str
    pid: int
    code_version: str | None = None  # the billing_jobs version that ran it (`billing-jobs --version`)

    @property
    def error_line(self) -> str:
        return (self.error or "").strip().splitlines()[0] if (self.error or "").strip() else ""

    def seconds(self, now: datetime) -> float:
        """Duration; for a run that has not finished, the time since it started."""
        end = self.finished_at or now
        return max((end - self.started_at).total_seconds(), 0.0)

    def key_counts(self) -> dict[str, Any]:
        return {k: self.counts[k] for k in KEY_COUNTS if k in self.counts}


@dataclass(frozen=True)
class LockInfo:
    name: str
    run_id: str
    host: str
    pid: int
    acquired_at: datetime  # naive UTC
    expires_at: datetime | None  # naive UTC; SQLite's lease (PostgreSQL has none)
    job: str | None  # the job of the run holding it, when recorded
    alive: bool | None = None  # whether its holder lives, as the lock itself tells (db/lock.py)

    def held(self, now: datetime) -> bool:
        if self.alive is not None:
            return self.alive
        return self.expires_at is not None and self.expires_at > now


@dataclass(frozen=True)
class RejectCount:
    source_table: str
    reason: str
    count: int


@dataclass(frozen=True)
class ReconcileFinding:
    """A closed month whose latest reconcile found differences."""

    period: str
    run_id: str
    checked_at: datetime  # naive UTC
    differences: int
    difference_units: int


@dataclass(frozen=True)
class Facts:
    """Everything the probe decides on. `now` is naive UTC."""

    now: datetime
    timezone: str
    effective_from: date
    nightly_at: time
    close_overdue_days: int
    billed: frozenset[date]  # billed days on or after the effective date
    closed: dict[str, datetime]  # period -> closed_at (naive UTC)
    last_runs: dict[str, RunInfo]  # job -> its latest run
    locks: list[LockInfo] = field(default_factory=list)
    rejects_by_reason: list[RejectCount] = field(default_factory=list)
    rejects_by_period: dict[str, int] = field(default_factory=dict)
    held_months: dict[str, datetime] = field(default_factory=dict)  # period -> held_at: drafts to approve
    rejects_by_status: dict[str, int] = field(default_factory=dict)  # open, resolved, closed
    reconcile_differs: list[ReconcileFinding] = field(default_factory=list)

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def today(self) -> date:
        return self.now.replace(tzinfo=UTC).astimezone(self.zone).date()

    @property
    def last_billed_day(self) -> date | None:
        return max(self.billed) if self.billed else None

    @property
    def last_closed(self) -> str | None:
        return max(self.closed) if self.closed else None

    @property
    def open_rejects(self) -> int:
        return sum(r.count for r in self.rejects_by_reason)

    def held_lock(self) -> LockInfo | None:
        held = [lock for lock in self.locks if lock.held(self.now)]
        return held[0] if held else None


# ---------------------------------------------------------------------------
# Decisions (pure)
# ---------------------------------------------------------------------------


def local_start_utc(day: date, at: time, zone: ZoneInfo) -> datetime:
    """Naive UTC instant of local `day` at `at` in `zone`."""
    return datetime.combine(day, at, tzinfo=zone).astimezone(UTC).replace(tzinfo=None)


def month_end_utc(month: Month, zone: ZoneInfo) -> datetime:
    """Naive UTC instant at which `month` ends (local midnight after its last day)."""
    return local_start_utc(month.last_day + timedelta(days=1), time(0), zone)


def nightly_deadline(day: date, nightly_at: time, zone: ZoneInfo) -> datetime:
    """When billing day `day` must be billed by: `nightly_at` on the next day, plus grace."""
    return local_start_utc(day + timedelta(days=1), nightly_at, zone) + NIGHTLY_GRACE


def due_day(now: datetime, nightly_at: time, zone: ZoneInfo) -> date:
    """The latest billing day whose nightly deadline has passed at `now` (naive UTC)."""
    today = now.replace(tzinfo=UTC).astimezone(zone).date()
    day = today - timedelta(days=1)
    while nightly_deadline(day, nightly_at, zone) > now:
        day -= timedelta(days=1)
    return day


def ended_months(effective_from: date, today: date) -> list[Month]:
    """Months from the effective date's month up to the month before `today`."""
    out: list[Month] = []
    month, last = Month.of(effective_from), Month.of(today).previous()
    while month <= last:
        out.append(month)
        month = month.next()
    return out


@dataclass(frozen=True)
class UnclosedMonth:
    period: str
    ended_at: datetime  # naive UTC
    days_since_end: float
    overdue: bool


def unclosed_months(facts: Facts) -> list[UnclosedMonth]:
    zone = facts.zone
    limit = timedelta(days=facts.close_overdue_days)
    out = []
    for month in ended_months(facts.effective_from, facts.today):
        if str(month) in facts.closed:
            continue
        ended = month_end_utc(month, zone)
        since = facts.now - ended
        out.append(UnclosedMonth(str(month), ended, since.total_seconds() / 86400, since > limit))
    return out


def unbilled_days(facts: Facts) -> list[date]:
    """Days from the effective date up to yesterday (billing timezone) not billed yet."""
    yesterday = facts.today - timedelta(days=1)
    span = (yesterday - facts.effective_from).days + 1
    days = (facts.effective_from + timedelta(days=i) for i in range(max(span, 0)))
    return [d for d in days if d not in facts.billed]


def day_ranges(days: list[date]) -> list[tuple[date, date]]:
    """Sorted days as runs of consecutive days: [(first, last), ...]."""
    out: list[tuple[date, date]] = []
    for d in sorted(days):
        if out and d == out[-1][1] + timedelta(days=1):
            out[-1] = (out[-1][0], d)
        else:
            out.append((d, d))
    return out


def ranges_text(days: list[date], most: int = 3) -> str:
    """'2026-03-24..2026-09-30, 2026-11-01..2026-11-25' (the first `most` runs, then '...')."""
    runs = day_ranges(days)
    parts = [str(a) if a == b else f"{a}..{b}" for a, b in runs[:most]]
    if len(runs) > most:
        parts.append(f"and {len(runs) - most} more")
    return ", ".join(parts)


def _fmt(ts: datetime) -> str:
    return f"{ts:%Y-%m-%d %H:%M} UTC"


def decide(facts: Facts) -> list[str]:
    """The problems the probe reports, one sentence each; empty when healthy."""
    problems = []
    for m in unclosed_months(facts):
        if m.overdue and m.period in facts.held_months:
            problems.append(
                f"month {m.period} ended {m.days_since_end:.1f} days ago and its drafts await approval "
                f"(limit {facts.close_overdue_days} days): review them and run "
                f"`billing-jobs month-end --approve {m.period}`"
            )
        elif m.overdue:
            problems.append(
                f"month {m.period} ended {m.days_since_end:.1f} days ago and is not closed "
                f"(limit {facts.close_overdue_days} days): run `billing-jobs month-end --month {m.period}`"
            )
    nightly = facts.last_runs.get("nightly")
    if nightly is not None and nightly.status in (FAILED, ABANDONED):
        what = "failed" if nightly.status == FAILED else "was abandoned (its process died holding the lock)"
        detail = f": {nightly.error_line}" if nightly.error_line else ""
        problems.append(
            f"last nightly run {nightly.run_id} ({nightly.period}) {what} "
            f"at {_fmt(nightly.started_at)}{detail}"
        )
    zone = facts.zone
    due = due_day(facts.now, facts.nightly_at, zone)
    late = [d for d in unbilled_days(facts) if d <= due]
    if late:
        what = f"billing day {late[0]}" if len(late) == 1 else f"{len(late)} billing days"
        problems.append(
            f"{what} not billed ({ranges_text(late)}): nightly should have billed {late[-1]} "
            f"by {_fmt(nightly_deadline(late[-1], facts.nightly_at, zone))}"
        )
    for r in facts.reconcile_differs:
        problems.append(
            f"month {r.period}: its latest reconcile (run {r.run_id} at {_fmt(r.checked_at)}) found "
            f"{r.differences} difference(s), {format_units(r.difference_units)} credits in absolute value: "
            f"run `billing-jobs month-end --month {r.period}`, then "
            f"`billing-jobs reconcile --month {r.period}`"
        )
    return problems


def effective_status(recorded: str, run_id: str, locks: Iterable[LockInfo], now: datetime) -> str:
    """`running` stays running only while the run still holds an unexpired lock."""
    if recorded != RUNNING:
        return recorded
    if any(lock.run_id == run_id and lock.held(now) for lock in locks):
        return RUNNING
    return ABANDONED


# ---------------------------------------------------------------------------
# Loading (the jobs' own tables)
# ---------------------------------------------------------------------------


def check_tables(engine: Engine) -> None:
    names = set(inspect(engine).get_table_names())
    missing = [t for t in REQUIRED_TABLES if t not in names]
    if missing:
        raise TablesMissing(
            f"the jobs' tables do not exist ({', '.join(missing)}): run `billing-jobs db upgrade`"
        )


def _ts(value: Any) -> datetime:
    """A stored timestamp as naive UTC (SQLite may hand back text)."""
    ts: datetime = datetime.fromisoformat(value) if isinstance(value, str) else value
    return ts.astimezone(UTC).replace(tzinfo=None) if ts.tzinfo else ts


def _naive(value: Any) -> datetime | None:
    return None if value is None else _ts(value)


def _as_date(value: Any) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value))


def run_counts(text: str | None) -> dict[str, Any]:
    """The counts JSON of a run record as a dict (empty when missing or unreadable)."""
    if not text:
        return {}
    try:
        loaded = json.loads(text)
    except ValueError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def read_locks(conn: Connection) -> list[LockInfo]:
    """The rows of `billing_locks`, each with whether its holder is alive (`db.lock.read_holders`)."""
    of_runs = select(billing_runs.c.run_id, billing_runs.c.job).join(
        billing_locks, billing_locks.c.run_id == billing_runs.c.run_id
    )
    jobs: dict[str, str] = dict(conn.execute(of_runs).tuples().all())
    return [
        LockInfo(
            name=h.name,
            run_id=h.run_id,
            host=h.host,
            pid=h.pid,
            acquired_at=_ts(h.acquired_at),
            expires_at=_naive(h.expires_at),
            job=jobs.get(h.run_id),
            alive=h.alive,
        )
        for h in read_holders(conn)
    ]


def _run_info(row: Any, locks: list[LockInfo], now: datetime) -> RunInfo:
    return RunInfo(
        run_id=row.run_id,
        job=row.job,
        period=row.period,
        status=effective_status(row.status, row.run_id, locks, now),
        recorded_status=row.status,
        started_at=_ts(row.started_at),
        finished_at=_naive(row.finished_at),
        counts=run_counts(row.counts),
        error=None if row.error is None else scrub(row.error),  # records written before masking
        host=row.host,
        pid=row.pid,
        code_version=row.code_version,
    )


def read_runs(engine: Engine, now: datetime, *, limit: int = 20, job: str | None = None) -> list[RunInfo]:
    """The latest runs, newest first; `now` (naive UTC) decides which are abandoned."""
    check_tables(engine)
    br = billing_runs.c
    stmt = select(billing_runs).order_by(br.started_at.desc(), br.run_id.desc()).limit(limit)
    if job is not None:
        stmt = stmt.where(br.job == job)
    with engine.connect() as conn:
        locks = read_locks(conn)
        return [_run_info(r, locks, now) for r in conn.execute(stmt)]


def read_facts(engine: Engine, settings: Settings, now: datetime) -> Facts:
    """Load the probe's facts; `now` is naive UTC."""
    check_tables(engine)
    br = billing_runs.c
    with engine.connect() as conn:
        locks = read_locks(conn)
        billed = frozenset(
            _as_date(d)
            for (d,) in conn.execute(
                select(billed_days.c.billing_day).where(billed_days.c.billing_day >= settings.effective_from)
            )
        )
        closed = {p: _ts(t) for p, t in conn.execute(select(month_closes.c.period, month_closes.c.closed_at))}
        held_months = {
            p: _ts(t) for p, t in conn.execute(select(month_holds.c.period, month_holds.c.held_at))
        }
        last_runs: dict[str, RunInfo] = {}
        jobs = sorted({*JOBS, *conn.execute(select(br.job).distinct()).scalars()})
        for job in jobs:
            row = conn.execute(
                select(billing_runs)
                .where(br.job == job)
                .order_by(br.started_at.desc(), br.run_id.desc())
                .limit(1)
            ).first()
            if row is not None:
                last_runs[job] = _run_info(row, locks, now)
        rj = rejects.c
        by_reason = [
            RejectCount(t, r, int(n))
            for t, r, n in conn.execute(
                select(rj.source_table, rj.reason, func.count())
                .where(rj.status == "open")
                .group_by(rj.source_table, rj.reason)
                .order_by(rj.source_table, rj.reason)
            )
        ]
        by_status = count_by_status(conn)
        by_period = {
            p: int(n)
            for p, n in conn.execute(
                select(rj.period, func.count())
                .where(rj.status == "open")
                .group_by(rj.period)
                .order_by(rj.period)
            )
        }
        differs = _reconcile_differs(conn)
    return Facts(
        now=now,
        timezone=settings.timezone,
        effective_from=settings.effective_from,
        nightly_at=settings.nightly_at,
        close_overdue_days=settings.close_overdue_days,
        billed=billed,
        closed=closed,
        last_runs=last_runs,
        locks=locks,
        rejects_by_reason=by_reason,
        rejects_by_period=by_period,
        held_months=held_months,
        rejects_by_status=by_status,
        reconcile_differs=differs,
    )


def _reconcile_differs(conn: Connection) -> list[ReconcileFinding]:
    """Closed months whose latest reconcile differs (none before the table exists)."""
    if "month_reconciles" not in inspect(conn).get_table_names():
        return []
    from billing_jobs.db.reconcile_log import DIFFERS, latest_reconciles

    return [
        ReconcileFinding(p, r.run_id, _ts(r.checked_at), int(r.differences), int(r.difference_units))
        for p, r in latest_reconciles(conn).items()
        if r.status == DIFFERS
    ]


# ---------------------------------------------------------------------------
# Plain data for --json
# ---------------------------------------------------------------------------


def _iso(ts: datetime | None) -> str | None:
    return None if ts is None else ts.strftime("%Y-%m-%dT%H:%M:%SZ")


def run_record(run: RunInfo, now: datetime) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "job": run.job,
        "period": run.period,
        "status": run.status,
        "recorded_status": run.recorded_status,
        "started_at": _iso(run.started_at),
        "finished_at": _iso(run.finished_at),
        "seconds": round(run.seconds(now), 3),
        "counts": run.counts,
        "error": run.error_line or None,
        "host": run.host,
        "pid": run.pid,
        "code_version": run.code_version,
    }


def lock_record(lock: LockInfo) -> dict[str, Any]:
    return {
        "name": lock.name,
        "run_id": lock.run_id,
        "job": lock.job,
        "host": lock.host,
        "pid": lock.pid,
        "acquired_at": _iso(lock.acquired_at),
        "expires_at": _iso(lock.expires_at),
    }


def status_record(facts: Facts, problems: list[str]) -> dict[str, Any]:
    unbilled = unbilled_days(facts)
    held = facts.held_lock()
    return {
        "healthy": not problems,
        "problems": problems,
        "now": _iso(facts.now),
        "timezone": facts.timezone,
        "last_billed_day": str(facts.last_billed_day) if facts.last_billed_day else None,
        "unbilled_days": [str(d) for d in unbilled],
        "last_closed_month": facts.last_closed,
        "last_closed_at": _iso(facts.closed[facts.last_closed]) if facts.last_closed else None,
        "unclosed_months": [
            {
                "period": m.period,
                "ended_at": _iso(m.ended_at),
                "days_since_end": round(m.days_since_end, 2),
                "overdue": m.overdue,
                "held_for_approval": m.period in facts.held_months,
            }
            for m in unclosed_months(facts)
        ],
        "open_rejects": {
            "total": facts.open_rejects,
            "by_reason": [
                {"source_table": r.source_table, "reason": r.reason, "count": r.count}
                for r in facts.rejects_by_reason
            ],
            "by_period": dict(facts.rejects_by_period),
        },
        "rejects_by_status": dict(facts.rejects_by_status),
        "reconcile_differs": [
            {
                "period": r.period,
                "run_id": r.run_id,
                "checked_at": _iso(r.checked_at),
                "differences": r.differences,
                "difference": format_units(r.difference_units),
            }
            for r in facts.reconcile_differs
        ],
        "last_runs": {job: run_record(run, facts.now) for job, run in facts.last_runs.items()},
        "lock": lock_record(held) if held else None,
    }
