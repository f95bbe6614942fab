"""The long-running scheduler: `billing-jobs schedule` (APScheduler 3.x).

Jobs, built from `[schedule]` by the pure `build_jobs`, in the billing
timezone (`[billing] timezone`):

- `nightly`: every day at `nightly_at`, runs `billing-jobs nightly` (no
  `--date`): it bills every day not billed yet up to yesterday, so a scheduler
  that was down for days bills every missed day on its next run;
- `month-end`: on day `month_end_day` at `month_end_at`, runs
  `billing-jobs month-end` (the previous month);
- `reconcile` (unless `reconcile_months` = 0): every day at `reconcile_at`,
  runs `billing-jobs reconcile` (the last `reconcile_months` closed months);
  with `auto_adjust`, each month it finds differing is re-closed by
  `billing-jobs month-end --month M` and checked again (`reconcile_and_adjust`).

All have `coalesce=True` (runs missed while the process was busy or suspended
collapse into one), `max_instances=1`, and `misfire_grace_time` =
`misfire_grace_seconds` (a run late by less than this still starts; a later one
is skipped and logged). They share one worker thread, so a month-end due while
the nightly still runs waits for it instead of meeting its lock.

How a job runs: as a child process of the same console entry,
`python -m billing_jobs <command>`, with the database URL and settings file
passed in the environment (never on the command line, where `ps` shows
passwords). Why a child process rather than calling `cli.main` in this one:

- every run starts clean: settings re-read, no memory or connections left over
  from the last run in a process that lives for months, and a crash or an OOM
  kill of a run cannot take the scheduler down with it;
- failures and the lock behave exactly as for a run from cron: the exit status
  is the contract's (0 done, 2 bad settings, 75 another run holds the lock,
  1 failed) and the run records, lock lease and metrics are the command's own;
- the child runs in its own session, so a Ctrl-C or a SIGTERM sent to the
  scheduler's process group does not kill a run half-way: the scheduler stops
  taking new runs and waits for the running one to finish.

Exit 75 (the lock is taken: a manual run, a CronJob, another scheduler) is
logged as a warning and the job is tried again every `LOCK_RETRY_SECONDS`
for up to `misfire_grace_seconds` (a nightly would catch up the next night
anyway; a month-end would otherwise wait a month). Any other failure is
logged as an error; the scheduler keeps running, and the next nightly catches
up anyway.

Catch-up on start (default on; `--no-catch-up-on-start` turns it off): when
the last successful nightly ended more than a day ago (or never), the nightly
runs once right away; when the previous month is not closed although its
month-end time has passed (and the month is not before the effective date),
the month-end runs right away too.

Daylight saving: APScheduler's cron trigger fires a wall-clock time that
occurs twice (the autumn change) twice; `WallClockCronTrigger` fires only its
first occurrence, so each job fires once per local day. A wall-clock time that
does not exist (spring change, e.g. 02:30 in Europe/Berlin on 2026-03-29) fires
once, an hour later by the clock (03:30 local time).

Time: APScheduler asks the clock to know when to fire; the decisions made here
take "now" as an argument and never ask it themselves.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from threading import TIMEOUT_MAX
from types import FrameType
from typing import Any
from zoneinfo import ZoneInfo

from apscheduler.events import (
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
    EVENT_SCHEDULER_STARTED,
    JobEvent,
    SchedulerEvent,
)
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.base import STATE_STOPPED, BaseScheduler
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import Engine, func, inspect, select

from billing_jobs import lifeline
from billing_jobs.db.billing_tables import billing_runs, month_closes
from billing_jobs.logs import get_logger
from billing_jobs.rules.calendar import Month
from billing_jobs.settings import Settings

EX_TEMPFAIL = 75
EX_USAGE = 2
LOCK_RETRY_SECONDS = 300
CATCH_UP_AFTER = timedelta(days=1)
JOB_IDS = ("nightly", "month-end", "reconcile")
EX_DIFFERS = 1  # `reconcile`: a month differs
POLL_SECONDS = 1.0  # how soon the scheduler loop notices a stop request

# Runs one command line of `billing-jobs` (without the program name); returns its exit status.
CommandRunner = Callable[[Sequence[str]], int]


class WallClockCronTrigger(CronTrigger):  # type: ignore[misc]  # APScheduler 3 has no type hints
    """A cron trigger that fires a wall-clock time once per local day, DST or not.

    Skips the second occurrence of a time the autumn change repeats (`fold=1`),
    and returns a time that the spring change skips as the real instant it
    stands for (02:30 CET that never happens = 03:30 CEST).
    """

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime | None:
        fire = super().get_next_fire_time(previous_fire_time, now)
        while fire is not None and _second_occurrence(fire):
            fire = super().get_next_fire_time(fire, fire)
        if fire is None:
            return None
        return datetime.fromtimestamp(fire.timestamp(), fire.tzinfo)


def _second_occurrence(moment: datetime) -> bool:
    """True for the repeated instance of a wall-clock time after an autumn change."""
    return moment.fold == 1 and moment.replace(fold=0).utcoffset() != moment.utcoffset()


@dataclass(frozen=True)
class JobSpec:
    """One scheduled job: its id, trigger, command line and APScheduler options."""

    id: str
    trigger: CronTrigger
    argv: tuple[str, ...]
    coalesce: bool = True
    max_instances: int = 1
    misfire_grace_time: int = 21600
    description: str = ""

    def add_to(self, scheduler: BaseScheduler, func: Callable[..., Any], **extra: Any) -> None:
        scheduler.add_job(
            func,
            trigger=self.trigger,
            args=(self,),
            id=self.id,
            name=self.description or self.id,
            coalesce=self.coalesce,
            max_instances=self.max_instances,
            misfire_grace_time=self.misfire_grace_time,
            replace_existing=True,
            **extra,
        )


def build_jobs(settings: Settings) -> list[JobSpec]:
    """The scheduled jobs from `[schedule]`, in the billing timezone (pure)."""
    zone = settings.zone
    nightly_at, month_end_at = settings.nightly_at, settings.month_end_at
    return [
        JobSpec(
            id="nightly",
            trigger=WallClockCronTrigger(
                hour=nightly_at.hour, minute=nightly_at.minute, second=nightly_at.second, timezone=zone
            ),
            argv=("nightly",),
            misfire_grace_time=settings.misfire_grace_seconds,
            description=f"nightly: every day at {nightly_at:%H:%M} {settings.timezone}",
        ),
        JobSpec(
            id="month-end",
            trigger=WallClockCronTrigger(
                day=settings.month_end_day,
                hour=month_end_at.hour,
                minute=month_end_at.minute,
                second=month_end_at.second,
                timezone=zone,
            ),
            argv=("month-end",),
            misfire_grace_time=settings.misfire_grace_seconds,
            description=(
                f"month-end: day {settings.month_end_day} at {month_end_at:%H:%M} "
                f"{settings.timezone}, closes the previous month"
            ),
        ),
        *([reconcile_spec(settings)] if settings.reconcile_months > 0 else []),
    ]


def reconcile_spec(settings: Settings) -> JobSpec:
    at = settings.reconcile_at
    return JobSpec(
        id="reconcile",
        trigger=WallClockCronTrigger(
            hour=at.hour, minute=at.minute, second=at.second, timezone=settings.zone
        ),
        argv=("reconcile",),
        misfire_grace_time=settings.misfire_grace_seconds,
        description=(
            f"reconcile: every day at {at:%H:%M} {settings.timezone}, the last "
            f"{settings.reconcile_months} closed months" + (", auto-adjusted" if settings.auto_adjust else "")
        ),
    )


def lock_retries(settings: Settings) -> int:
    """How many times a run that met the lock is retried: within the misfire grace time."""
    return settings.misfire_grace_seconds // LOCK_RETRY_SECONDS


def job_by_id(settings: Settings, job_id: str) -> JobSpec:
    """A job by its id (`reconcile` too when it is not scheduled: `--once` may run it)."""
    for spec in [*build_jobs(settings), reconcile_spec(settings)]:
        if spec.id == job_id:
            return spec
    raise KeyError(job_id)


# --- Running a command ------------------------------------------------------------------------


def subprocess_runner(
    db_url: str, config: str | None, log_level: str = "INFO", python: str = sys.executable
) -> CommandRunner:
    """Run `python -m billing_jobs ARGV` as a child process in its own session."""

    def run(argv: Sequence[str]) -> int:
        env = dict(os.environ)
        env["BILLING_DB_URL"] = db_url
        if config is not None:
            env["BILLING_CONFIG"] = os.path.abspath(config)
        else:
            env.pop("BILLING_CONFIG", None)
        command = [python, "-m", "billing_jobs", "--log-level", log_level, *argv]
        # The child stops (SIGTERM from the kernel) if this process dies, even by SIGKILL:
        # no run outlives its scheduler (`lifeline`). This thread waits for it meanwhile.
        env[lifeline.PARENT_VARIABLE] = str(os.getpid())
        # stdout and stderr are the scheduler's: the child's results and JSON logs land
        # in the same log stream. A new session keeps terminal and group signals away.
        return subprocess.run(command, env=env, check=False, start_new_session=True).returncode

    return run


def inprocess_runner(db_url: str, config: str | None, log_level: str = "INFO") -> CommandRunner:
    """Run `billing-jobs ARGV` in this process through `cli.main` (tests, `--once`)."""

    def run(argv: Sequence[str]) -> int:
        from billing_jobs.cli import main

        args = ["--db-url", db_url, "--log-level", log_level]
        if config is not None:
            args += ["--config", config]
        try:
            main([*args, *argv])
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return 0

    return run


@dataclass
class JobRunner:
    """Runs scheduled jobs and turns their exit status into logs, never exceptions.

    Exit 75 (the lock is taken) is retried every `retry_seconds`, at most
    `max_retries` times; the wait ends early when `stopping` is set (the
    scheduler is shutting down), and a job due after that does not start.
    """

    run_command: CommandRunner
    retry_seconds: float = LOCK_RETRY_SECONDS
    max_retries: int = 0
    stopping: threading.Event = field(default_factory=threading.Event)

    def __call__(self, spec: JobSpec) -> int | None:
        log = get_logger(scheduled_job=spec.id)
        attempt = 0
        while True:
            if self.stopping.is_set():
                log.warning("schedule.job.not_started", detail="the scheduler is stopping")
                return None
            code = self.run_once(spec, attempt)
            if code != EX_TEMPFAIL:
                return code
            if attempt >= self.max_retries:
                if self.max_retries:
                    log.error("schedule.job.gave_up", attempts=attempt + 1, detail="the lock stayed taken")
                return code
            attempt += 1
            if self.stopping.wait(self.retry_seconds):
                log.warning("schedule.job.retry_cancelled", detail="the scheduler is stopping")
                return code

    def run_once(self, spec: JobSpec, attempt: int = 0) -> int:
        log = get_logger(scheduled_job=spec.id, attempt=attempt)
        log.info("schedule.job.start", command=" ".join(spec.argv))
        try:
            code = self.run_command(spec.argv)
        except Exception as exc:
            log.error("schedule.job.failed", error=f"{type(exc).__name__}: {exc}")
            return 1
        if code == 0:
            log.info("schedule.job.done", exit_status=code)
        elif code == EX_TEMPFAIL:
            log.warning("schedule.job.locked", exit_status=code, detail="another run holds the lock")
        elif code == EX_USAGE:
            log.error("schedule.job.failed", exit_status=code, detail="bad settings or arguments")
        else:
            log.error("schedule.job.failed", exit_status=code)
        return code


# --- Reconcile, and re-close what differs -------------------------------------------------------


def reconcile_and_adjust(
    runner: JobRunner, spec: JobSpec, db_url: str, settings: Settings, now: datetime
) -> int | None:
    """The scheduled reconcile: run `spec` (`billing-jobs reconcile`); with `[schedule]
    auto_adjust`, re-close each month whose check at or after `now` found differences
    (`billing-jobs month-end --month M`, as from the command line) and check it again.

    Returns the exit status that stands: the reconcile's, or with auto_adjust the
    first failure of a re-close or re-check (0 when every month agrees again).
    """
    code = runner(spec)
    if code != EX_DIFFERS or not settings.auto_adjust:
        return code
    log = get_logger(scheduled_job=spec.id)
    try:
        months = differing_months(db_url, now)
    except Exception as exc:  # the scheduler keeps running; the next reconcile tries again
        log.error("schedule.reconcile.unknown", error=f"{type(exc).__name__}: {exc}")
        return code
    if not months:
        log.error(
            "schedule.reconcile.nothing_to_adjust", detail="reconcile failed without recording differences"
        )
        return code
    outcome: int | None = 0
    for month in months:
        log.warning(
            "schedule.reconcile.adjust", period=month, detail="re-closing a month whose invoices differ"
        )
        steps = [("month-end", "--month", month), ("reconcile", "--month", month)]
        for argv in steps:
            done = runner(JobSpec(f"{argv[0]}-{month}", spec.trigger, argv, description=" ".join(argv)))
            if done != 0:
                log.error(
                    "schedule.reconcile.adjust_failed", period=month, command=" ".join(argv), exit_status=done
                )
                outcome = outcome or done
                break
        else:
            log.info("schedule.reconcile.adjusted", period=month)
    return outcome


def differing_months(db_url: str, since: datetime) -> list[str]:
    """Closed months whose latest check, made at or after `since`, found differences."""
    from billing_jobs.db.engine import make_engine
    from billing_jobs.db.reconcile_log import DIFFERS, latest_reconciles

    since_naive = since.astimezone(UTC).replace(tzinfo=None) if since.tzinfo else since
    engine = make_engine(db_url)
    try:
        if "month_reconciles" not in inspect(engine).get_table_names():
            return []
        with engine.connect() as conn:
            latest = latest_reconciles(conn)
    finally:
        engine.dispose()
    return [
        p for p, row in latest.items() if row.status == DIFFERS and _naive_ts(row.checked_at) >= since_naive
    ]


def _naive_ts(value: Any) -> datetime:
    return datetime.fromisoformat(value) if isinstance(value, str) else value


@dataclass
class ReconcileJob:
    """What the scheduler calls for the reconcile job: `reconcile_and_adjust` at the clock's now."""

    runner: JobRunner
    db_url: str
    settings: Settings

    def __call__(self, spec: JobSpec) -> int | None:
        return reconcile_and_adjust(self.runner, spec, self.db_url, self.settings, datetime.now(UTC))


# --- Catch-up on start --------------------------------------------------------------------------


@dataclass(frozen=True)
class Facts:
    """What catch-up on start needs from the database."""

    last_nightly_success: datetime | None  # naive UTC
    closed_months: frozenset[str]


def read_facts(engine: Engine) -> Facts:
    tables = set(inspect(engine).get_table_names())
    if not {"billing_runs", "month_closes"} <= tables:
        return Facts(None, frozenset())
    with engine.connect() as conn:
        last = conn.execute(
            select(func.max(billing_runs.c.finished_at)).where(
                billing_runs.c.job == "nightly", billing_runs.c.status == "succeeded"
            )
        ).scalar()
        closed = frozenset(p for (p,) in conn.execute(select(month_closes.c.period)))
    return Facts(last, closed)


def nightly_is_behind(last_success: datetime | None, now: datetime) -> bool:
    """True when the last successful nightly ended more than a day before `now` (or never)."""
    if last_success is None:
        return True
    now_naive = now.astimezone(UTC).replace(tzinfo=None)
    return now_naive - last_success > CATCH_UP_AFTER


def month_end_is_behind(settings: Settings, closed: frozenset[str], now: datetime) -> Month | None:
    """The previous month, when its month-end time has passed and it is still not closed."""
    zone = settings.zone
    local_now = now.astimezone(zone)
    month = Month.of(local_now.date()).previous()
    if month.last_day < settings.effective_from or str(month) in closed:
        return None
    due = _local(date(local_now.year, local_now.month, settings.month_end_day), settings.month_end_at, zone)
    return month if now >= due else None


def _local(day: date, at: time, zone: ZoneInfo) -> datetime:
    return datetime.combine(day, at, tzinfo=zone)


def catch_up_jobs(settings: Settings, facts: Facts, now: datetime) -> list[str]:
    """Which jobs to run right away on start, in order."""
    due = []
    if nightly_is_behind(facts.last_nightly_success, now):
        due.append("nightly")
    if month_end_is_behind(settings, facts.closed_months, now) is not None:
        due.append("month-end")
    return due


# --- The scheduler process --------------------------------------------------------------------


class StoppableScheduler(BlockingScheduler):  # type: ignore[misc]  # untyped base
    """A `BlockingScheduler` whose loop also ends when `stopping` is set.

    A signal handler only sets `stopping` (no locks, no logging, nothing that a
    signal arriving at the wrong moment could deadlock); the loop sees it within
    `POLL_SECONDS` and returns from `start()`, and the main thread then calls
    `shutdown(wait=True)` itself, which lets a running job finish. (Calling
    `shutdown` from the handler races with the loop: APScheduler 3 then fails to
    remove a one-off job it has just started.)
    """

    def __init__(self, stopping: threading.Event, **options: Any) -> None:
        super().__init__(**options)
        self.stopping = stopping

    def _main_loop(self) -> None:
        wait_seconds: float | None = TIMEOUT_MAX
        while self.state != STATE_STOPPED and not self.stopping.is_set():
            assert self._event is not None
            self._event.wait(min(wait_seconds if wait_seconds is not None else TIMEOUT_MAX, POLL_SECONDS))
            self._event.clear()
            if self.stopping.is_set():
                return
            wait_seconds = self._process_jobs()


def make_scheduler(settings: Settings, stopping: threading.Event | None = None) -> StoppableScheduler:
    """A blocking scheduler in the billing timezone with one worker thread."""
    return StoppableScheduler(
        stopping if stopping is not None else threading.Event(),
        timezone=settings.zone,
        executors={"default": ThreadPoolExecutor(max_workers=1)},
        job_defaults={"coalesce": True, "max_instances": 1},
    )


def install(
    scheduler: BaseScheduler,
    settings: Settings,
    runner: JobRunner,
    *,
    catch_up: list[str],
    now: datetime,
    reconcile: Callable[[JobSpec], int | None] | None = None,
) -> None:
    """Add the scheduled jobs and the catch-up runs (due at `now`) to `scheduler`.

    reconcile: what runs the reconcile job (a `ReconcileJob`; default: `runner`).
    """
    specs = {spec.id: spec for spec in build_jobs(settings)}
    for spec in specs.values():
        spec.add_to(scheduler, reconcile if spec.id == "reconcile" and reconcile is not None else runner)
    for offset, job_id in enumerate(catch_up):
        scheduler.add_job(
            runner,
            trigger="date",
            run_date=now + timedelta(seconds=offset),
            args=(specs[job_id],),
            id=f"{job_id}-catch-up",
            name=f"{job_id}: catch-up on start",
            misfire_grace_time=settings.misfire_grace_seconds,
            replace_existing=True,
        )

    def on_event(event: JobEvent) -> None:
        what = "schedule.job.missed" if event.code == EVENT_JOB_MISSED else "schedule.job.skipped"
        get_logger(scheduled_job=event.job_id).warning(
            what, scheduled_for=str(getattr(event, "scheduled_run_time", ""))
        )

    def on_start(event: SchedulerEvent) -> None:
        for job in scheduler.get_jobs():
            get_logger(scheduled_job=job.id).info(
                "schedule.job.planned", name=job.name, next_run=str(job.next_run_time)
            )

    scheduler.add_listener(on_event, EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES)
    scheduler.add_listener(on_start, EVENT_SCHEDULER_STARTED)


def run_scheduler(
    scheduler: StoppableScheduler,
    *,
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> None:
    """Run until SIGTERM or SIGINT; then let the running job finish and return."""
    log = get_logger()
    received: list[str] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        # Only list.append and Event.set: the event's lock is never held by the main thread
        # (it only asks is_set), so a signal cannot arrive while this thread holds it.
        received.append(signal.Signals(signum).name)
        scheduler.stopping.set()

    previous = {sig: signal.signal(sig, stop) for sig in signals}
    try:
        if not scheduler.stopping.is_set():
            scheduler.start()
        log.info(
            "schedule.stopping", signal=received[0] if received else None, detail="waiting for a running job"
        )
        if scheduler.running:
            scheduler.shutdown(wait=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("schedule.stopped")
