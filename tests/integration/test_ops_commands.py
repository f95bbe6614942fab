"""`billing-jobs runs` and `billing-jobs status`: what ran, and is anything wrong.

The probe's decisions are pure (`jobs.status.decide` over `Facts`) and tested
first without a database; then the commands on both back ends, with the clock
frozen (`utcnow` is the only clock the commands read).
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import pytest
import time_machine
from sqlalchemy import create_engine, insert

from billing_jobs.db.billing_tables import billing_locks, billing_runs
from billing_jobs.jobs import status as st
from tests.support import SourceData, holding_writer_lock, run_cli

# ---------------------------------------------------------------------------
# Pure decisions (facts hold naive UTC timestamps, as stored)
# ---------------------------------------------------------------------------


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    """A naive UTC timestamp."""
    return datetime(year, month, day, hour, minute, tzinfo=UTC).replace(tzinfo=None)


def _run(job: str, status: str, *, error: str | None = None, run_id: str = "r-1") -> st.RunInfo:
    return st.RunInfo(
        run_id=run_id,
        job=job,
        period="2026-06-01..2026-06-01",
        status=status,
        recorded_status=status,
        started_at=at(2026, 6, 2, 2, 30),
        finished_at=at(2026, 6, 2, 2, 31),
        counts={},
        error=error,
        host="h",
        pid=1,
    )


def _facts(
    now: datetime,
    *,
    billed_through: date | None = None,
    closed: tuple[str, ...] = (),
    timezone: str = "UTC",
    last_runs: dict[str, st.RunInfo] | None = None,
    nightly_at: time = time(2, 30),
) -> st.Facts:
    effective = date(2026, 3, 24)
    billed: set[date] = set()
    if billed_through is not None:
        billed = {effective + timedelta(days=i) for i in range((billed_through - effective).days + 1)}
    return st.Facts(
        now=now,
        timezone=timezone,
        effective_from=effective,
        nightly_at=nightly_at,
        close_overdue_days=3,
        billed=frozenset(billed),
        closed={p: at(2026, 1, 1) for p in closed},
        last_runs=last_runs or {},
    )


CLOSED_TO_APRIL = ("2026-03", "2026-04")


def test_a_fully_billed_and_closed_database_has_no_problems() -> None:
    facts = _facts(at(2026, 5, 20, 12), billed_through=date(2026, 5, 19), closed=CLOSED_TO_APRIL)
    assert st.decide(facts) == []


def test_a_month_is_overdue_only_after_more_than_close_overdue_days() -> None:
    on_time = _facts(at(2026, 6, 4, 0, 0), billed_through=date(2026, 6, 3), closed=CLOSED_TO_APRIL)
    late = _facts(at(2026, 6, 4, 0, 1), billed_through=date(2026, 6, 3), closed=CLOSED_TO_APRIL)
    assert st.decide(on_time) == []
    [problem] = st.decide(late)
    assert problem.startswith("month 2026-05 ended 3.0 days ago and is not closed")
    assert [m.period for m in st.unclosed_months(on_time)] == ["2026-05"]


def test_a_closed_month_whose_latest_reconcile_differs_is_a_problem() -> None:
    healthy = _facts(at(2026, 5, 20, 12), billed_through=date(2026, 5, 19), closed=CLOSED_TO_APRIL)
    finding = st.ReconcileFinding("2026-04", "run-1", at(2026, 5, 20, 3, 30), 2, 300_000)
    facts = dataclasses.replace(healthy, reconcile_differs=[finding])
    [problem] = st.decide(facts)
    assert problem.startswith("month 2026-04: its latest reconcile (run run-1 at 2026-05-20 03:30 UTC)")
    assert "found 2 difference(s)" in problem
    assert "30 credits in absolute value: run `billing-jobs month-end --month 2026-04`" in problem
    assert st.status_record(facts, [problem])["reconcile_differs"] == [
        {
            "period": "2026-04",
            "run_id": "run-1",
            "checked_at": "2026-05-20T03:30:00Z",
            "differences": 2,
            "difference": "30",
        }
    ]


def test_months_before_the_effective_date_are_never_due() -> None:
    facts = _facts(at(2026, 3, 25, 12), billed_through=date(2026, 3, 24))
    assert st.ended_months(date(2026, 3, 24), date(2026, 3, 25)) == []
    assert st.decide(facts) == []


def test_the_month_end_follows_the_billing_timezone() -> None:
    # May ends at 2026-05-31 16:00 UTC in Shanghai: 3 days later is 06-03 16:00 UTC.
    before = _facts(
        at(2026, 6, 3, 15, 59),
        billed_through=date(2026, 6, 2),
        closed=CLOSED_TO_APRIL,
        timezone="Asia/Shanghai",
    )
    after = _facts(
        at(2026, 6, 3, 16, 1),
        billed_through=date(2026, 6, 2),
        closed=CLOSED_TO_APRIL,
        timezone="Asia/Shanghai",
    )
    assert st.decide(before) == []
    assert any(p.startswith("month 2026-05") for p in st.decide(after))


def test_yesterday_unbilled_is_a_problem_only_after_nightly_time_plus_six_hours() -> None:
    # Nightly at 02:30 Berlin (CEST, UTC+2) on 06-05 bills 06-04; grace ends 08:30 local = 06:30 UTC.
    closed = ("2026-03", "2026-04", "2026-05")
    billed = date(2026, 6, 3)
    before = _facts(at(2026, 6, 5, 6, 29), billed_through=billed, closed=closed, timezone="Europe/Berlin")
    after = _facts(at(2026, 6, 5, 6, 31), billed_through=billed, closed=closed, timezone="Europe/Berlin")
    assert st.decide(before) == []
    [problem] = st.decide(after)
    assert problem.startswith("billing day 2026-06-04 not billed")
    assert "by 2026-06-05 06:30 UTC" in problem


def test_a_nightly_time_late_in_the_evening_moves_the_deadline_past_midnight() -> None:
    facts = _facts(
        at(2026, 6, 6, 1, 0),
        billed_through=date(2026, 6, 3),
        closed=("2026-03", "2026-04", "2026-05"),
        nightly_at=time(20, 0),
    )
    # 06-04 was due on 06-05 20:00 + 6h = 06-06 02:00: not yet; 06-03 is billed.
    assert st.due_day(facts.now, facts.nightly_at, facts.zone) == date(2026, 6, 3)
    assert st.decide(facts) == []


def test_a_failed_or_abandoned_last_nightly_run_is_a_problem_but_a_failed_month_end_is_not() -> None:
    now = at(2026, 5, 20, 12)

    def facts(job: str, status: str, error: str | None = None) -> st.Facts:
        last = {job: _run(job, status, error=error)}
        return _facts(now, billed_through=date(2026, 5, 19), closed=CLOSED_TO_APRIL, last_runs=last)

    failed = facts("nightly", "failed", error="OperationalError: boom\nSQL")
    abandoned = facts("nightly", "abandoned")
    month_end = facts("month-end", "failed")
    [p1] = st.decide(failed)
    assert "failed" in p1
    assert p1.endswith(": OperationalError: boom")
    [p2] = st.decide(abandoned)
    assert "abandoned" in p2
    assert st.decide(month_end) == []


def test_a_running_run_is_abandoned_once_its_lock_is_gone_or_expired() -> None:
    now = at(2026, 6, 1, 12)
    lock = st.LockInfo(
        "billing-writer", "r-1", "h", 1, now - timedelta(minutes=5), now + timedelta(minutes=1), "nightly"
    )
    expired = st.LockInfo(
        "billing-writer", "r-1", "h", 1, now - timedelta(hours=1), now - timedelta(seconds=1), "nightly"
    )
    assert st.effective_status("running", "r-1", [lock], now) == "running"
    assert st.effective_status("running", "r-1", [expired], now) == "abandoned"
    assert st.effective_status("running", "r-1", [], now) == "abandoned"
    assert st.effective_status("running", "r-2", [lock], now) == "abandoned"
    assert st.effective_status("failed", "r-1", [], now) == "failed"


def test_unbilled_days_are_shown_as_ranges() -> None:
    days = [date(2026, 5, 1), date(2026, 5, 2), date(2026, 5, 3), date(2026, 5, 7), date(2026, 6, 1)]
    assert st.ranges_text(days) == "2026-05-01..2026-05-03, 2026-05-07, 2026-06-01"
    assert st.ranges_text(days, most=1) == "2026-05-01..2026-05-03, and 2 more"


# ---------------------------------------------------------------------------
# The commands, on both back ends
# ---------------------------------------------------------------------------


def _utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def _status_json(db_url: str) -> tuple[int, dict[str, Any]]:
    result = run_cli(db_url, "status", "--json")
    return result.code, json.loads(result.stdout)


def _legacy_project(db_url: str) -> None:
    SourceData().project("p1", created="2025-11-02").write_url(db_url)


def test_status_exits_1_while_a_month_is_overdue_and_0_once_month_end_closes_it(db_url: str) -> None:
    _legacy_project(db_url)
    with time_machine.travel(_utc(2026, 6, 5, 12), tick=False) as traveller:
        assert run_cli(db_url, "nightly").code == 0  # bills 03-24..06-04
        for month in ("2026-03", "2026-04"):
            assert run_cli(db_url, "month-end", "--month", month).code == 0

        result = run_cli(db_url, "status")
        assert result.code == 1, result.stderr
        problems = [line for line in result.stdout.splitlines() if line.startswith("problem: ")]
        assert len(problems) == 1
        assert problems[0].startswith("problem: month 2026-05 ended 4.5 days ago and is not closed")
        assert "last billed day:   2026-06-04" in result.stdout
        assert "last closed month: 2026-04" in result.stdout

        traveller.shift(timedelta(minutes=1))
        assert run_cli(db_url, "month-end", "--month", "2026-05").code == 0
        result = run_cli(db_url, "status")
        assert result.code == 0, result.stdout
        assert "status: ok" in result.stdout
        code, doc = _status_json(db_url)
        assert code == 0
        assert doc["healthy"] is True
        assert doc["last_closed_month"] == "2026-05"
        assert doc["unclosed_months"] == []
        assert doc["last_runs"]["nightly"]["status"] == "succeeded"
        assert doc["last_runs"]["month-end"]["period"] == "2026-05"
        assert doc["lock"] is None


def test_status_lists_a_recently_ended_month_without_failing(db_url: str) -> None:
    _legacy_project(db_url)
    with time_machine.travel(_utc(2026, 6, 2, 12), tick=False):
        assert run_cli(db_url, "nightly").code == 0
        for month in ("2026-03", "2026-04"):
            assert run_cli(db_url, "month-end", "--month", month).code == 0
        code, doc = _status_json(db_url)
    assert code == 0, doc["problems"]
    assert [(m["period"], m["overdue"]) for m in doc["unclosed_months"]] == [("2026-05", False)]


def test_status_reports_yesterday_unbilled_after_the_nightly_deadline(db_url: str) -> None:
    _legacy_project(db_url)
    with time_machine.travel(_utc(2026, 5, 20, 1), tick=False):
        assert run_cli(db_url, "nightly").code == 0  # bills through 05-19
        assert run_cli(db_url, "month-end", "--month", "2026-03").code == 0
        assert run_cli(db_url, "month-end", "--month", "2026-04").code == 0
    with time_machine.travel(_utc(2026, 5, 21, 8, 29), tick=False):
        assert _status_json(db_url)[0] == 0
    with time_machine.travel(_utc(2026, 5, 21, 8, 31), tick=False):
        code, doc = _status_json(db_url)
    assert code == 1
    assert doc["unbilled_days"] == ["2026-05-20"]
    assert doc["problems"] == [
        "billing day 2026-05-20 not billed (2026-05-20): nightly should have billed 2026-05-20 "
        "by 2026-05-21 08:30 UTC"
    ]


def test_a_failed_run_shows_as_failed_with_its_error_and_fails_the_probe(db_url: str) -> None:
    # The jobs' tables exist but the source tables do not: the nightly run fails.
    assert run_cli(db_url, "db", "upgrade").code == 0
    with time_machine.travel(_utc(2026, 5, 2, 12), tick=False):
        failed = run_cli(db_url, "nightly", "--date", "2026-05-01")
        assert failed.code == 1
        lines = run_cli(db_url, "runs", "--json").stdout.splitlines()
        table = run_cli(db_url, "runs")
        status = run_cli(db_url, "status")
    [record] = [json.loads(line) for line in lines]
    assert record["job"] == "nightly"
    assert record["status"] == "failed"
    assert record["period"] == "2026-05-01..2026-05-01"
    assert "projects" in record["error"]
    assert "\n" not in record["error"]
    assert table.code == 0
    assert "failed" in table.stdout
    assert record["run_id"][:8] in table.stdout
    assert status.code == 1
    assert any(
        line.startswith(f"problem: last nightly run {record['run_id']} (2026-05-01..2026-05-01) failed")
        for line in status.stdout.splitlines()
    )


def _insert_run(conn: Any, run_id: str, job: str, started: datetime, status: str = "running") -> None:
    conn.execute(
        insert(billing_runs).values(
            run_id=run_id,
            job=job,
            arguments="{}",
            period="2026-05",
            settings_hash="x",
            code_version="0",
            host="worker-7",
            pid=4242,
            status=status,
            started_at=started,
        )
    )


def _dead_lock_row(conn: Any, run_id: str, acquired: datetime) -> None:
    """The lock row a run on another host left when it died: no session holds it
    (PostgreSQL), and its lease ran out long ago (SQLite)."""
    conn.execute(
        insert(billing_locks).values(
            name="billing-writer",
            run_id=run_id,
            host="worker-7",
            pid=4242,
            acquired_at=acquired,
            expires_at=acquired + timedelta(minutes=30),
        )
    )


def test_a_running_run_whose_lock_expired_shows_as_abandoned(db_url: str) -> None:
    assert run_cli(db_url, "db", "upgrade").code == 0
    now = at(2026, 6, 5, 12)
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            _insert_run(conn, "dead-run-0000", "month-end", now - timedelta(hours=2))
            _dead_lock_row(conn, "dead-run-0000", now - timedelta(hours=2))
    finally:
        engine.dispose()
    with time_machine.travel(_utc(2026, 6, 5, 12), tick=False):
        [record] = [json.loads(x) for x in run_cli(db_url, "runs", "--json").stdout.splitlines()]
        table = run_cli(db_url, "runs").stdout
        _, doc = _status_json(db_url)
    assert record["status"] == "abandoned"
    assert record["recorded_status"] == "running"
    assert record["seconds"] == 7200
    assert "abandoned" in table
    assert "2h00m" in table
    assert doc["lock"] is None  # an expired lease is not held
    assert doc["last_runs"]["month-end"]["status"] == "abandoned"


def test_the_next_run_marks_a_dead_holders_run_abandoned_and_a_nightly_success_clears_the_problem(
    db_url: str,
) -> None:
    _legacy_project(db_url)
    assert run_cli(db_url, "db", "upgrade").code == 0
    now = at(2026, 6, 5, 12)
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            _insert_run(conn, "dead-nightly", "nightly", now - timedelta(hours=2))
            _dead_lock_row(conn, "dead-nightly", now - timedelta(hours=2))
    finally:
        engine.dispose()
    with time_machine.travel(_utc(2026, 6, 5, 12), tick=False) as traveller:
        _, before = _status_json(db_url)
        traveller.shift(timedelta(minutes=1))
        assert run_cli(db_url, "nightly").code == 0
        runs = [json.loads(x) for x in run_cli(db_url, "runs", "--json").stdout.splitlines()]
        _, after = _status_json(db_url)
    assert [p for p in before["problems"] if "abandoned" in p] != []
    [dead] = [r for r in runs if r["run_id"] == "dead-nightly"]
    [finder] = [r for r in runs if r["run_id"] != "dead-nightly"]
    assert (dead["status"], dead["recorded_status"]) == ("abandoned", "abandoned")
    assert dead["finished_at"] == "2026-06-05T12:01:00Z"
    assert dead["error"].endswith(f"found by run {finder['run_id']}")
    assert finder["status"] == "succeeded"
    assert [p for p in after["problems"] if "nightly" in p] == []
    assert after["last_runs"]["nightly"]["run_id"] == finder["run_id"]


def test_a_running_run_holding_its_lock_shows_as_running_and_status_names_the_holder(db_url: str) -> None:
    assert run_cli(db_url, "db", "upgrade").code == 0
    now = at(2026, 6, 5, 12)
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            _insert_run(conn, "live-run-0000", "nightly", now - timedelta(minutes=3))
    finally:
        engine.dispose()
    live = holding_writer_lock(
        db_url, since="2026-06-05 11:57", run_id="live-run-0000", host="worker-7", pid=4242
    )
    with live, time_machine.travel(_utc(2026, 6, 5, 12), tick=False):
        [record] = [json.loads(x) for x in run_cli(db_url, "runs", "--json").stdout.splitlines()]
        text = run_cli(db_url, "status").stdout
        _, doc = _status_json(db_url)
    assert record["status"] == "running"
    assert doc["lock"]["run_id"] == "live-run-0000"
    assert doc["lock"]["job"] == "nightly"
    assert doc["lock"]["host"] == "worker-7"
    assert (
        "lock:              held: 'billing-writer' by run live-run-0000 (nightly) on worker-7 pid 4242 "
        "since 2026-06-05 11:57:00 UTC"
    ) in text


def test_runs_are_listed_newest_first_and_filtered_by_job_and_limit(db_url: str) -> None:
    _legacy_project(db_url)
    with time_machine.travel(_utc(2026, 6, 5, 12), tick=False) as traveller:
        assert run_cli(db_url, "nightly").code == 0
        traveller.shift(timedelta(minutes=5))
        assert run_cli(db_url, "month-end", "--month", "2026-04").code == 0
        traveller.shift(timedelta(minutes=5))
        assert run_cli(db_url, "month-end", "--month", "2026-05").code == 0
        all_runs = [json.loads(x) for x in run_cli(db_url, "runs", "--json").stdout.splitlines()]
        month_ends = [
            json.loads(x) for x in run_cli(db_url, "runs", "--json", "--job", "month-end").stdout.splitlines()
        ]
        latest = [
            json.loads(x) for x in run_cli(db_url, "runs", "--json", "--limit", "1").stdout.splitlines()
        ]
        bad = run_cli(db_url, "runs", "--job", "weekly")
    assert [(r["job"], r["period"]) for r in all_runs] == [
        ("month-end", "2026-05"),
        ("month-end", "2026-04"),
        ("nightly", "2026-03-24..2026-06-04"),
    ]
    assert all(r["status"] == "succeeded" for r in all_runs)
    assert all_runs[2]["counts"]["days_billed"] == 73
    assert [r["period"] for r in month_ends] == ["2026-05", "2026-04"]
    assert [r["period"] for r in latest] == ["2026-05"]
    assert bad.code == 2


def test_status_counts_open_rejects_by_reason_and_period(db_url: str) -> None:
    data = SourceData().project("p1", created="2025-11-02")
    data.compute("ghost", "2026-05-03 10:00", "1")  # unknown project
    data.compute("p1", "2026-05-04 10:00", None)  # missing amount
    data.cloud("p1", "2026-05-02", "page_views", "100")  # not published that day
    data.cloud("p1", "2026-04-02", "page_views", "100")  # not published that day
    data.write_url(db_url)
    with time_machine.travel(_utc(2026, 6, 2, 12), tick=False):
        assert run_cli(db_url, "month-end", "--month", "2026-04").code == 0
        assert run_cli(db_url, "month-end", "--month", "2026-05").code == 0
        _, doc = _status_json(db_url)
        text = run_cli(db_url, "status").stdout
    rejects = doc["open_rejects"]
    assert rejects["total"] == 4
    assert {(r["source_table"], r["reason"]): r["count"] for r in rejects["by_reason"]} == {
        ("cloud_usage", "not_published_that_day"): 2,
        ("compute_usage", "missing_amount"): 1,
        ("compute_usage", "unknown_project"): 1,
    }
    assert rejects["by_period"] == {"2026-04": 1, "2026-05": 3}
    assert "open rejects:      4" in text
    assert "by period: 2026-04: 1, 2026-05: 3" in text


def test_status_and_runs_say_so_and_exit_1_when_the_jobs_tables_do_not_exist(db_url: str) -> None:
    for args in (("status",), ("status", "--json"), ("runs",)):
        result = run_cli(db_url, *args)
        assert result.code == 1
        assert "the jobs' tables do not exist" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["runs", "status"])
def test_ops_commands_have_help_text(command: str) -> None:
    result = run_cli(None, command, "--help")
    assert result.code == 0
    assert "Example" in result.stdout
