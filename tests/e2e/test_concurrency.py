"""Two runs at once, as real processes: one proceeds, the other exits 75; nothing is charged twice.

Each contending run is `python -m billing_jobs ...` in its own process (a run
after the contention may run in-process, which is quicker). The overlap is made
certain without sleeping: the test process itself holds the writer lock (as a
run on another host would), or releases two waiting runs at the same instant.
The result is always compared with a single run on a copy of the same source
data, in a second database.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from process_runs import (
    PYTHON,
    another_database,
    billing_state,
    busy_month,
    child_env,
    finish,
    lock_holder,
    plain_lines,
    run_process,
    run_records,
    start_cli,
    write_source,
)
from support import CliResult, run_cli

from billing_jobs.db.billing_tables import billing_runs
from billing_jobs.db.engine import make_engine
from billing_jobs.db.lock import WRITER_LOCK, Lease

pytestmark = pytest.mark.slow

MONTH = "2026-05"
ACCOUNTS = 12
EX_TEMPFAIL = 75
# A run that finds the lock held must not wait for it (SQLite's busy timeout is 60 s).
AT_ONCE = 45
JOBS = {
    "month-end": ("month-end", "--month", MONTH),
    "nightly": ("nightly", "--date", "2026-05-10"),
}


@pytest.fixture
def reference_url(request: pytest.FixtureRequest, db_url: str) -> Iterator[str]:
    yield from another_database(request, db_url)


def prepare(db_url: str, reference_url: str, job: str) -> dict[str, object]:
    """The same source data in both databases; the state a single run leaves in the reference."""
    write_source(busy_month(ACCOUNTS), db_url, reference_url)
    for url in (db_url, reference_url):
        assert run_cli(url, "db", "upgrade").code == 0
    alone = run_cli(reference_url, *JOBS[job])
    assert alone.code == 0, alone.stderr
    state = billing_state(reference_url, MONTH)
    assert state["daily_charges"], "the data set charges nothing: the test would prove nothing"
    if job == "month-end":
        assert state["invoice_lines"]
    return state


def assert_locked_out(result: CliResult, holder: str) -> None:
    """Exit 75, nothing on stdout, and one plain line on stderr naming the holder."""
    assert result.code == EX_TEMPFAIL, result.stderr
    assert result.stdout == ""
    [line] = plain_lines(result.stderr)
    assert line.startswith("billing-jobs: another run holds the lock 'billing-writer' (run "), line
    assert holder in line


def no_line_twice(state: dict[str, object]) -> None:
    lines = state["invoice_lines"]
    assert isinstance(lines, list)
    # invoice_id, project_id, line_type, account_id, period, ...: one line per key per month
    keys = Counter((row[3], row[1], row[2], row[4]) for row in lines)
    assert [k for k, n in keys.items() if n > 1] == []
    invoices = state["invoices"]
    assert isinstance(invoices, list)
    per_account = Counter((row[1], row[2], row[3]) for row in invoices)  # account, period, kind
    assert [k for k, n in per_account.items() if n > 1] == []


def runs_of(db_url: str, job: str) -> list[tuple[str, dict[str, int]]]:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(billing_runs.c.status, billing_runs.c.counts)
                .where(billing_runs.c.job == job)
                .order_by(billing_runs.c.started_at)
            ).all()
    finally:
        engine.dispose()
    return [(status, json.loads(counts or "{}")) for status, counts in rows]


@pytest.mark.parametrize("job", sorted(JOBS))
def test_a_run_started_while_another_holds_the_lock_exits_75_at_once_and_writes_nothing(
    db_url: str, reference_url: str, tmp_path: Path, job: str
) -> None:
    alone = prepare(db_url, reference_url, job)
    empty = billing_state(db_url)
    engine = make_engine(db_url)
    holder = Lease(engine, WRITER_LOCK, "run-elsewhere", "ops-host-2", 4711, 3600)
    try:
        holder.acquire(datetime.now(UTC).replace(tzinfo=None))
        locked = run_process(db_url, *JOBS[job], cwd=tmp_path, timeout=AT_ONCE)
        assert_locked_out(locked, "run run-elsewhere on ops-host-2, pid 4711")
        assert billing_state(db_url) == empty
        assert lock_holder(db_url).run_id == "run-elsewhere"
        assert [status for status, _ in runs_of(db_url, job)] == ["locked"]

        holder.release()
        done = run_cli(db_url, *JOBS[job])
        assert done.code == 0, done.stderr
    finally:
        engine.dispose()
    assert billing_state(db_url, MONTH) == alone
    assert lock_holder(db_url) is None


@pytest.mark.parametrize("job", sorted(JOBS))
def test_two_runs_started_together_charge_once_and_equal_a_single_run(
    db_url: str, reference_url: str, tmp_path: Path, job: str
) -> None:
    alone = prepare(db_url, reference_url, job)
    procs = [start_cli(db_url, *JOBS[job], cwd=tmp_path) for _ in range(2)]
    results = [finish(p) for p in procs]
    codes = sorted(r.code for r in results)
    assert codes in ([0, EX_TEMPFAIL], [0, 0]), [r.stderr for r in results]
    for r in results:
        if r.code == EX_TEMPFAIL:
            assert_locked_out(r, "run ")
    state = billing_state(db_url, MONTH)
    no_line_twice(state)
    assert state == alone
    runs = runs_of(db_url, job)
    if codes == [0, 0]:
        # They did not overlap: the second found everything done and wrote nothing.
        (_, first), (_, second) = runs
        assert second.get("rows_inserted", 0) == second.get("rows_deleted", 0) == 0
        assert second.get("invoices", 0) == 0
        assert first.get("rows_inserted", 0) > 0
    else:
        assert sorted(status for status, _ in runs) == ["locked", "succeeded"]


def test_two_month_end_runs_let_go_at_the_same_instant_one_proceeds_and_one_exits_75(
    pg_db_url: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """PostgreSQL: both runs wait on the lock table, which the test holds, then race for the lease."""
    reference = another_database(request, pg_db_url)
    reference_url = next(reference)
    try:
        alone = prepare(pg_db_url, reference_url, "month-end")
        gate = sa.create_engine(pg_db_url)
        try:
            with gate.begin() as conn:
                conn.execute(sa.text("LOCK TABLE billing_locks IN ACCESS EXCLUSIVE MODE"))
                procs = [start_cli(pg_db_url, *JOBS["month-end"], cwd=tmp_path) for _ in range(2)]
                wait_for_lock_waiters(gate, 2, procs)
            results = [finish(p) for p in procs]
        finally:
            gate.dispose()
        assert sorted(r.code for r in results) == [0, EX_TEMPFAIL], [r.stderr for r in results]
        [loser] = [r for r in results if r.code == EX_TEMPFAIL]
        assert_locked_out(loser, "run ")
        state = billing_state(pg_db_url, MONTH)
        no_line_twice(state)
        assert state == alone
    finally:
        next(reference, None)


def wait_for_lock_waiters(engine: sa.Engine, count: int, procs: list[subprocess.Popen[str]]) -> None:
    """Return once `count` sessions of this database wait for a lock (none may have exited)."""
    query = sa.text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    for _ in range(6000):
        with engine.connect() as conn:
            if conn.execute(query).scalar_one() >= count:
                return
        for p in procs:
            try:
                p.wait(0.02)
            except subprocess.TimeoutExpired:
                continue
            raise AssertionError(f"a run ended before the gate opened: {finish(p)}")
    raise AssertionError("the runs never reached the lock")


# A run (the real `run_job`) that holds the lock until told to go on, then writes once.
# argv: database URL, the host name it reports ("" for the real one), [lock] lease_seconds.
HOLDER = """
import socket, sys
from datetime import UTC, date, datetime
if sys.argv[2]:
    socket.gethostname = lambda: sys.argv[2]
from billing_jobs import logs
from billing_jobs.db.billing_tables import billed_days
from billing_jobs.db.engine import make_engine
from billing_jobs.jobs.runner import run_job
from billing_jobs.settings import Settings

def body(run):
    print("held", flush=True)
    sys.stdin.readline()
    run.write(lambda conn: conn.execute(
        billed_days.insert().values(billing_day=date(2026, 4, 30), run_id=run.run_id, billed_at=run.now)
    ))

logs.configure()  # to stderr, as the command line does
settings = Settings(lock_lease_seconds=int(sys.argv[3]))
engine = make_engine(sys.argv[1])
run_job(engine, settings, "month-end", period="2026-05", arguments={}, body=body, now=datetime.now(UTC))
print("done", flush=True)
"""


def start_holder(db_url: str, tmp_path: Path, host: str, lease_seconds: int) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [PYTHON, "-c", HOLDER, db_url, host, str(lease_seconds)],
        cwd=tmp_path,
        env=child_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline() == "held\n", finish(holder).stderr
    return holder


def test_a_lock_left_by_a_killed_run_is_taken_over_at_once_and_the_killed_run_marked_abandoned(
    db_url: str, reference_url: str, tmp_path: Path
) -> None:
    alone = prepare(db_url, reference_url, "month-end")
    killed = start_holder(db_url, tmp_path, "", 3600)  # a lease of an hour, which must not matter
    assert lock_holder(db_url).pid == killed.pid
    os.kill(killed.pid, signal.SIGKILL)
    assert finish(killed).code == -signal.SIGKILL

    started = time.monotonic()
    after = run_process(db_url, *JOBS["month-end"], cwd=tmp_path, timeout=AT_ONCE)
    assert after.code == 0, after.stderr
    assert time.monotonic() - started < AT_ONCE
    assert billing_state(db_url, MONTH) == alone
    assert lock_holder(db_url) is None
    records = run_records(db_url)
    [dead] = [r for r in records if r["pid"] == killed.pid]
    finder = records[-1]
    assert (dead["status"], finder["status"]) == ("abandoned", "succeeded")
    assert dead["error"].endswith(f"found by run {finder['run_id']}")
    listed = [json.loads(line) for line in run_cli(db_url, "runs", "--json").stdout.splitlines()]
    assert [r["status"] for r in listed if r["run_id"] == dead["run_id"]] == ["abandoned"]


@pytest.mark.parametrize("host", ["this-host", "another-host"])
def test_a_live_holder_silent_past_its_lease_is_not_taken_over(
    db_url: str, tmp_path: Path, host: str
) -> None:
    """The holder computes (no write) for longer than its SQLite lease: its heartbeat keeps
    the lease. On this host SQLite also sees its pid alive; from another host only the lease
    tells. (PostgreSQL has no lease: its session lives.)"""
    write_source(busy_month(2), db_url)
    assert run_cli(db_url, "db", "upgrade").code == 0
    lease = 2
    holder = start_holder(db_url, tmp_path, "" if host == "this-host" else "far-away-host", lease)
    try:
        time.sleep(2.5 * lease)
        contender = run_cli(db_url, *JOBS["nightly"])
        assert_locked_out(contender, f"pid {holder.pid}")
        assert billing_state(db_url)["daily_charges"] == []
    finally:
        assert holder.stdin is not None
        holder.stdin.write("go on\n")
        holder.stdin.flush()
    done = finish(holder)
    assert done.code == 0, done.stderr
    assert done.stdout == "done\n"
    assert [str(day) for (day, *_) in billing_state(db_url)["billed_days"]] == ["2026-04-30"]
    assert [r["status"] for r in run_records(db_url)] == ["succeeded", "locked"]


def test_two_first_runs_on_a_new_database_create_the_schema_once_and_charge_once(
    db_url: str, reference_url: str, tmp_path: Path
) -> None:
    """Neither database has the jobs' tables: both runs migrate first, which must not collide."""
    write_source(busy_month(ACCOUNTS), db_url, reference_url)
    alone = run_cli(reference_url, *JOBS["month-end"])
    assert alone.code == 0, alone.stderr
    procs = [start_cli(db_url, *JOBS["month-end"], cwd=tmp_path) for _ in range(2)]
    results = [finish(p) for p in procs]
    codes = sorted(r.code for r in results)
    assert codes in ([0, EX_TEMPFAIL], [0, 0]), [plain_lines(r.stderr) for r in results]
    state = billing_state(db_url, MONTH)
    no_line_twice(state)
    assert state == billing_state(reference_url, MONTH)
