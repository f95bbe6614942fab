"""The scheduler's triggers, job options, catch-up decisions and run handling.

Time is driven, not frozen: APScheduler 3 triggers answer
`get_next_fire_time(previous_fire_time, now)`, so the tests walk a trigger
through the calendar the way the scheduler does (each fire time becomes the
next call's previous fire time and "now").
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from apscheduler.triggers.cron import CronTrigger
from structlog.testing import capture_logs

from billing_jobs.rules.calendar import Month
from billing_jobs.scheduler import (
    EX_TEMPFAIL,
    Facts,
    JobRunner,
    JobSpec,
    WallClockCronTrigger,
    build_jobs,
    catch_up_jobs,
    install,
    job_by_id,
    lock_retries,
    make_scheduler,
    month_end_is_behind,
    nightly_is_behind,
    reconcile_and_adjust,
    run_scheduler,
)
from billing_jobs.settings import Settings

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def fire_times(trigger: CronTrigger, start: datetime, until: datetime) -> list[datetime]:
    """Every fire time from `start` to `until`, asked as the scheduler asks."""
    out: list[datetime] = []
    previous = None
    now = start
    while True:
        fire = trigger.get_next_fire_time(previous, now)
        if fire is None or fire > until:
            return out
        out.append(fire)
        previous, now = fire, fire


def naive_utc(*parts: int) -> datetime:
    """A naive UTC timestamp, as the run records hold them."""
    return datetime(*parts, tzinfo=UTC).replace(tzinfo=None)  # type: ignore[misc]


def in_utc(fires: list[datetime]) -> list[datetime]:
    """As UTC: Python never finds an ambiguous local time equal to a time in another zone."""
    return [f.astimezone(UTC) for f in fires]


def local(when: datetime, zone: ZoneInfo) -> datetime:
    return when.astimezone(zone)


def nightly_trigger(zone: str) -> CronTrigger:
    return job_by_id(Settings(timezone=zone), "nightly").trigger


def month_end_trigger(zone: str, **settings: object) -> CronTrigger:
    return job_by_id(Settings(timezone=zone, **settings), "month-end").trigger  # type: ignore[arg-type]


# --- Job definitions -----------------------------------------------------------------------------


def test_build_jobs_defines_nightly_month_end_and_reconcile_jobs_with_the_settings_options() -> None:
    settings = Settings(timezone="Europe/Berlin", misfire_grace_seconds=900)
    jobs = {spec.id: spec for spec in build_jobs(settings)}
    assert sorted(jobs) == ["month-end", "nightly", "reconcile"]
    for spec in jobs.values():
        assert spec.coalesce is True
        assert spec.max_instances == 1
        assert spec.misfire_grace_time == 900
        assert isinstance(spec.trigger, WallClockCronTrigger)
        assert spec.trigger.timezone == BERLIN
    assert jobs["nightly"].argv == ("nightly",)
    assert jobs["month-end"].argv == ("month-end",)
    assert jobs["reconcile"].argv == ("reconcile",)


def test_the_reconcile_job_runs_daily_at_reconcile_at_and_is_off_with_zero_months() -> None:
    settings = Settings(timezone="America/New_York", reconcile_at=time(5, 10))
    start = datetime(2026, 7, 1, tzinfo=NEW_YORK)
    fires = fire_times(job_by_id(settings, "reconcile").trigger, start, start + timedelta(days=2))
    assert fires == [
        datetime(2026, 7, 1, 5, 10, tzinfo=NEW_YORK),
        datetime(2026, 7, 2, 5, 10, tzinfo=NEW_YORK),
    ]
    off = Settings(reconcile_months=0)
    assert [spec.id for spec in build_jobs(off)] == ["nightly", "month-end"]
    assert job_by_id(off, "reconcile").argv == ("reconcile",)  # `schedule --once reconcile` still can


def test_the_scheduled_reconcile_re_closes_each_differing_month_only_with_auto_adjust() -> None:
    """The decisions of `reconcile_and_adjust` with the commands faked: exit 1 from the
    reconcile, the months that differ read from the database (none here: nothing recorded)."""
    calls: list[tuple[str, ...]] = []

    def commands(argv: Sequence[str]) -> int:
        calls.append(tuple(argv))
        return 1 if argv == ("reconcile",) else 0

    now = datetime(2026, 7, 3, 3, 30, tzinfo=UTC)
    spec = job_by_id(Settings(), "reconcile")
    assert reconcile_and_adjust(JobRunner(commands), spec, "sqlite://", Settings(), now) == 1
    assert calls == [("reconcile",)]
    calls.clear()
    with capture_logs() as logs:
        code = reconcile_and_adjust(JobRunner(commands), spec, "sqlite://", Settings(auto_adjust=True), now)
    assert code == 1  # nothing recorded as differing: nothing to re-close, the reconcile's status stands
    assert calls == [("reconcile",)]
    errors = [e["event"] for e in logs if e["log_level"] == "error"]
    assert errors == ["schedule.job.failed", "schedule.reconcile.nothing_to_adjust"]


def test_the_job_times_come_from_the_schedule_settings() -> None:
    settings = Settings(
        timezone="America/New_York", nightly_at=time(1, 15), month_end_day=3, month_end_at=time(6, 45)
    )
    start = datetime(2026, 7, 1, tzinfo=NEW_YORK)
    nightly = fire_times(job_by_id(settings, "nightly").trigger, start, start + timedelta(days=2))
    month_end = fire_times(
        job_by_id(settings, "month-end").trigger, start, datetime(2026, 9, 30, tzinfo=NEW_YORK)
    )
    assert nightly == [
        datetime(2026, 7, 1, 1, 15, tzinfo=NEW_YORK),
        datetime(2026, 7, 2, 1, 15, tzinfo=NEW_YORK),
    ]
    assert month_end == [
        datetime(2026, 7, 3, 6, 45, tzinfo=NEW_YORK),
        datetime(2026, 8, 3, 6, 45, tzinfo=NEW_YORK),
        datetime(2026, 9, 3, 6, 45, tzinfo=NEW_YORK),
    ]


def test_installed_jobs_carry_coalesce_max_instances_and_misfire_grace_time() -> None:
    settings = Settings(timezone="Europe/Berlin", misfire_grace_seconds=1234)
    scheduler = make_scheduler(settings)
    runner = JobRunner(lambda argv: 0)
    now = datetime(2026, 5, 2, 12, tzinfo=UTC)
    install(scheduler, settings, runner, catch_up=[], now=now)
    install(scheduler, settings, runner, catch_up=["nightly"], now=now)  # replace_existing: no duplicates
    jobs = {job.id: job for job in scheduler.get_jobs()}
    assert sorted(jobs) == ["month-end", "nightly", "nightly-catch-up", "reconcile"]
    for job_id in ("nightly", "month-end", "reconcile"):
        job = jobs[job_id]
        assert job.coalesce is True
        assert job.max_instances == 1
        assert job.misfire_grace_time == 1234
        assert job.trigger.timezone == BERLIN
    assert jobs["nightly-catch-up"].trigger.run_date == now
    assert scheduler.timezone == BERLIN


def test_a_lock_conflict_is_retried_within_the_misfire_grace_time() -> None:
    assert lock_retries(Settings(misfire_grace_seconds=21600)) == 72
    assert lock_retries(Settings(misfire_grace_seconds=60)) == 0


# --- Nightly across daylight saving --------------------------------------------------------------


@pytest.mark.parametrize(
    ("zone", "start", "until"),
    [
        pytest.param("Europe/Berlin", date(2026, 3, 26), date(2026, 4, 1), id="berlin-spring-2026-03-29"),
        pytest.param("Europe/Berlin", date(2026, 10, 22), date(2026, 10, 28), id="berlin-autumn-2026-10-25"),
        pytest.param(
            "America/New_York", date(2026, 3, 5), date(2026, 3, 11), id="new-york-spring-2026-03-08"
        ),
        pytest.param(
            "America/New_York", date(2026, 10, 29), date(2026, 11, 4), id="new-york-autumn-2026-11-01"
        ),
        pytest.param("UTC", date(2026, 3, 26), date(2026, 4, 1), id="utc"),
    ],
)
def test_nightly_fires_once_every_local_day_across_a_dst_change(zone: str, start: date, until: date) -> None:
    tz = ZoneInfo(zone)
    fires = fire_times(
        nightly_trigger(zone),
        datetime.combine(start, time(0), tzinfo=tz),
        datetime.combine(until, time(23, 59), tzinfo=tz),
    )
    days = [local(f, tz).date() for f in fires]
    assert days == [start + timedelta(days=i) for i in range((until - start).days + 1)]
    assert all(f > p for p, f in itertools.pairwise(fires))


def test_nightly_fires_at_0230_local_time_on_both_sides_of_a_berlin_dst_change() -> None:
    fires = fire_times(
        nightly_trigger("Europe/Berlin"),
        datetime(2026, 3, 28, tzinfo=BERLIN),
        datetime(2026, 3, 30, 23, tzinfo=BERLIN),
    )
    assert in_utc(fires) == [
        datetime(2026, 3, 28, 1, 30, tzinfo=UTC),  # 02:30 CET
        datetime(2026, 3, 29, 1, 30, tzinfo=UTC),  # no 02:30 that day: 03:30 CEST, the same instant
        datetime(2026, 3, 30, 0, 30, tzinfo=UTC),  # 02:30 CEST
    ]
    assert [local(f, BERLIN).time() for f in fires] == [time(2, 30), time(3, 30), time(2, 30)]


def test_nightly_fires_only_the_first_0230_of_the_night_berlin_repeats_it() -> None:
    fires = fire_times(
        nightly_trigger("Europe/Berlin"),
        datetime(2026, 10, 24, 12, tzinfo=BERLIN),
        datetime(2026, 10, 26, 12, tzinfo=BERLIN),
    )
    assert in_utc(fires) == [
        datetime(2026, 10, 25, 0, 30, tzinfo=UTC),  # 02:30 CEST; the 02:30 CET an hour later does not fire
        datetime(2026, 10, 26, 1, 30, tzinfo=UTC),  # 02:30 CET
    ]


def test_the_plain_cron_trigger_would_fire_twice_in_the_repeated_hour() -> None:
    """Why `WallClockCronTrigger` exists (fails once APScheduler fixes it; then drop the subclass)."""
    plain = CronTrigger(hour=2, minute=30, timezone=BERLIN)
    fires = fire_times(
        plain, datetime(2026, 10, 25, tzinfo=BERLIN), datetime(2026, 10, 25, 23, tzinfo=BERLIN)
    )
    assert len(fires) == 2


def test_a_scheduler_started_between_the_two_repeated_0230s_waits_for_the_next_night() -> None:
    trigger = nightly_trigger("Europe/Berlin")
    # 02:45 CEST, after the first 02:30 and before the repeated one
    now = datetime(2026, 10, 25, 0, 45, tzinfo=UTC)
    assert trigger.get_next_fire_time(None, now) == datetime(2026, 10, 26, 1, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("zone", "days_without_0230"),
    [("Europe/Berlin", 1), ("America/New_York", 1), ("Asia/Shanghai", 0), ("UTC", 0)],
)
def test_nightly_fires_exactly_once_on_each_day_of_a_whole_year(zone: str, days_without_0230: int) -> None:
    tz = ZoneInfo(zone)
    fires = fire_times(
        nightly_trigger(zone), datetime(2026, 1, 1, tzinfo=tz), datetime(2026, 12, 31, 23, 59, tzinfo=tz)
    )
    per_day = Counter(local(f, tz).date() for f in fires)
    assert len(per_day) == 365
    assert set(per_day.values()) == {1}
    at_0230 = sum(1 for f in fires if local(f, tz).time() == time(2, 30))
    assert at_0230 == 365 - days_without_0230  # the spring change day has no 02:30


# --- Month-end -----------------------------------------------------------------------------------


@pytest.mark.parametrize("zone", ["Europe/Berlin", "America/New_York", "UTC"])
def test_month_end_fires_once_a_month_on_day_1_at_0400_local_time(zone: str) -> None:
    tz = ZoneInfo(zone)
    fires = fire_times(
        month_end_trigger(zone), datetime(2026, 1, 1, 4, 0, 1, tzinfo=tz), datetime(2027, 1, 31, tzinfo=tz)
    )
    assert fires == [datetime(2026, m, 1, 4, 0, tzinfo=tz) for m in range(2, 13)] + [
        datetime(2027, 1, 1, 4, 0, tzinfo=tz)
    ]


def test_month_end_fires_at_local_time_in_the_months_berlin_changes_its_clocks() -> None:
    fires = fire_times(
        month_end_trigger("Europe/Berlin"),
        datetime(2026, 3, 1, 5, tzinfo=BERLIN),
        datetime(2026, 11, 2, tzinfo=BERLIN),
    )
    assert in_utc(fires)[0] == datetime(2026, 4, 1, 2, 0, tzinfo=UTC)  # after the March change: 04:00 CEST
    assert in_utc(fires)[-2] == datetime(2026, 10, 1, 2, 0, tzinfo=UTC)  # 04:00 CEST
    assert in_utc(fires)[-1] == datetime(2026, 11, 1, 3, 0, tzinfo=UTC)  # after October's change: 04:00 CET
    assert len(fires) == 8


def test_month_end_on_a_dst_change_day_at_a_time_the_clock_skips_still_fires_once() -> None:
    # 2026-03-08 is New York's spring change; 02:30 does not exist that day.
    fires = fire_times(
        month_end_trigger("America/New_York", month_end_day=8, month_end_at=time(2, 30)),
        datetime(2026, 2, 9, tzinfo=NEW_YORK),
        datetime(2026, 4, 9, tzinfo=NEW_YORK),
    )
    assert fires == [
        datetime(2026, 3, 8, 3, 30, tzinfo=NEW_YORK),
        datetime(2026, 4, 8, 2, 30, tzinfo=NEW_YORK),
    ]


# --- Catch-up on start --------------------------------------------------------------------------


def test_nightly_catches_up_on_start_when_its_last_success_is_more_than_a_day_old() -> None:
    now = datetime(2026, 5, 10, 12, tzinfo=UTC)
    assert nightly_is_behind(None, now)
    assert nightly_is_behind(naive_utc(2026, 5, 9, 11, 59), now)
    assert not nightly_is_behind(naive_utc(2026, 5, 9, 12, 1), now)


def test_month_end_catches_up_on_start_when_the_previous_month_is_overdue() -> None:
    settings = Settings(timezone="Europe/Berlin")
    before_due = datetime(2026, 6, 1, 1, 59, tzinfo=UTC)  # 03:59 CEST
    after_due = datetime(2026, 6, 1, 2, 0, tzinfo=UTC)  # 04:00 CEST
    assert month_end_is_behind(settings, frozenset(), before_due) is None
    assert month_end_is_behind(settings, frozenset(), after_due) == Month(2026, 5)
    assert month_end_is_behind(settings, frozenset({"2026-05"}), after_due) is None


def test_month_end_does_not_catch_up_a_month_before_the_effective_date() -> None:
    settings = Settings(effective_from=date(2026, 3, 24))
    assert month_end_is_behind(settings, frozenset(), datetime(2026, 3, 20, tzinfo=UTC)) is None
    assert month_end_is_behind(settings, frozenset(), datetime(2026, 4, 20, tzinfo=UTC)) == Month(2026, 3)


def test_catch_up_on_start_runs_the_nightly_before_the_month_end() -> None:
    settings = Settings()
    now = datetime(2026, 7, 2, tzinfo=UTC)
    assert catch_up_jobs(settings, Facts(None, frozenset()), now) == ["nightly", "month-end"]
    fresh = Facts(naive_utc(2026, 7, 1, 2, 31), frozenset({"2026-06"}))
    assert catch_up_jobs(settings, fresh, now) == []


# --- Running a job -------------------------------------------------------------------------------


class FakeCommand:
    """Answers each call with the next exit status (or raises it)."""

    def __init__(self, *answers: int | Exception) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, argv: Sequence[str]) -> int:
        self.calls.append(tuple(argv))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


SPEC = JobSpec(id="nightly", trigger=CronTrigger(hour=2), argv=("nightly",))


def test_a_lock_conflict_is_a_warning_and_is_tried_again() -> None:
    command = FakeCommand(EX_TEMPFAIL, EX_TEMPFAIL, 0)
    with capture_logs() as logs:
        code = JobRunner(command, retry_seconds=0, max_retries=5)(SPEC)
    assert code == 0
    assert command.calls == [("nightly",)] * 3
    locked = [e for e in logs if e["event"] == "schedule.job.locked"]
    assert [e["log_level"] for e in locked] == ["warning", "warning"]
    assert not [e for e in logs if e["log_level"] == "error"]


def test_a_lock_that_stays_taken_is_given_up_after_the_last_retry() -> None:
    command = FakeCommand(EX_TEMPFAIL, EX_TEMPFAIL, EX_TEMPFAIL)
    with capture_logs() as logs:
        code = JobRunner(command, retry_seconds=0, max_retries=2)(SPEC)
    assert code == EX_TEMPFAIL
    assert len(command.calls) == 3
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["schedule.job.gave_up"]


@pytest.mark.parametrize("answer", [1, 2, OSError("no such file: python")])
def test_a_failed_run_is_logged_and_not_raised(answer: int | Exception) -> None:
    command = FakeCommand(answer)
    with capture_logs() as logs:
        code = JobRunner(command, retry_seconds=0, max_retries=3)(SPEC)
    assert code == (answer if isinstance(answer, int) else 1)
    assert len(command.calls) == 1
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["schedule.job.failed"]


def test_a_stopping_scheduler_cancels_the_retry_and_starts_no_new_run() -> None:
    command = FakeCommand(EX_TEMPFAIL)
    runner = JobRunner(command, retry_seconds=3600, max_retries=3)
    runner.stopping.set()
    with capture_logs() as logs:
        assert runner(SPEC) is None
    assert command.calls == []
    assert [e["event"] for e in logs] == ["schedule.job.not_started"]


def test_the_wait_before_a_retry_ends_when_the_scheduler_stops() -> None:
    runner = JobRunner(FakeCommand(EX_TEMPFAIL), retry_seconds=3600, max_retries=3)

    def command(argv: Sequence[str]) -> int:
        runner.stopping.set()  # SIGTERM arrives while the run is busy
        return EX_TEMPFAIL

    runner.run_command = command
    with capture_logs() as logs:
        assert runner(SPEC) == EX_TEMPFAIL
    assert logs[-1]["event"] == "schedule.job.retry_cancelled"


def test_sigterm_lets_the_running_job_finish_and_stops_the_scheduler() -> None:
    settings = Settings()
    scheduler = make_scheduler(settings)
    finished = threading.Event()

    def command(argv: Sequence[str]) -> int:
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to the main thread, inside run_scheduler
        finished.set()
        return 0

    runner = JobRunner(command, stopping=scheduler.stopping)
    now = datetime.now(UTC)
    install(scheduler, settings, runner, catch_up=["nightly"], now=now)
    before = signal.getsignal(signal.SIGTERM)
    with capture_logs() as logs:
        run_scheduler(scheduler)
    assert finished.is_set()
    assert not scheduler.running
    assert signal.getsignal(signal.SIGTERM) == before
    events = [e["event"] for e in logs]
    assert events.index("schedule.stopping") < events.index("schedule.stopped")
    assert "schedule.job.done" in events
