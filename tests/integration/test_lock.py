"""The writer lock (db/lock.py): held while its holder lives, free once it died.

PostgreSQL: a session advisory lock; a holder dies here by having its session
terminated (`pg_terminate_backend`), which is what the server does when the
process behind it is killed. SQLite: a row whose holder on this host is checked
by its pid and start time, and whose holder elsewhere has a lease renewed by a
heartbeat on the database's clock. Races run in threads, on connections of
their own, against the real database. Killed processes: tests/e2e.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
import time_machine

from billing_jobs.db.billing_tables import billed_days, billing_locks, billing_runs
from billing_jobs.db.engine import make_engine, upgrade
from billing_jobs.db.lock import (
    WRITER_LOCK,
    Lease,
    LockHeld,
    LockLost,
    process_alive,
    process_key,
    read_holders,
    writer_lock_name,
)
from billing_jobs.jobs.runner import Run, run_job
from billing_jobs.settings import Settings

T0 = datetime.fromisoformat("2026-06-01 04:00:00")  # naive UTC, like the jobs' clock
LEASE = 60
HERE = socket.gethostname()


def upgraded(db_url: str) -> Iterator[sa.Engine]:
    """An engine on the upgraded database; the leases a test took are released after it."""
    eng = make_engine(db_url)
    upgrade(eng)
    leases.clear()
    try:
        yield eng
    finally:
        for held in leases:
            held.release()
        eng.dispose()


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    yield from upgraded(db_url)


leases: list[Lease] = []  # taken in a test, released after it


def lease(
    engine: sa.Engine,
    run_id: str,
    name: str = WRITER_LOCK,
    *,
    host: str = HERE,
    pid: int | None = None,
    seconds: int = LEASE,
) -> Lease:
    """A lease of this process (so SQLite can tell it is alive), unless told otherwise."""
    return Lease(engine, name, run_id, host, os.getpid() if pid is None else pid, seconds)


def taken(held: Lease) -> Lease:
    held.acquire(T0)
    leases.append(held)
    return held


def lock_row(engine: sa.Engine, name: str = WRITER_LOCK) -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.select(billing_locks).where(billing_locks.c.name == name)).first()


def mark_day(conn: sa.Connection, day: str, run_id: str) -> None:
    """A stand-in for a job's write: one row in one of the jobs' tables."""
    conn.execute(
        billed_days.insert().values(
            billing_day=datetime.fromisoformat(day).date(), run_id=run_id, billed_at=T0
        )
    )


def write_as(holder: Lease, *days: str) -> None:
    """One write transaction of `holder`, as `Run.write` makes it."""
    with holder.engine.begin() as conn:
        holder.assert_held(conn)
        for day in days:
            mark_day(conn, day, holder.run_id)
        holder.before_commit(conn)


def days_marked(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return [
            str(d)
            for (d,) in conn.execute(sa.select(billed_days.c.billing_day).order_by(billed_days.c.billing_day))
        ]


def record_run(engine: sa.Engine, run_id: str, status: str = "running") -> None:
    with engine.begin() as conn:
        conn.execute(
            billing_runs.insert().values(
                run_id=run_id,
                job="month-end",
                arguments="{}",
                period="2026-05",
                settings_hash="x",
                code_version="x",
                host="h",
                pid=1,
                status=status,
                started_at=T0,
            )
        )


def run_status(engine: sa.Engine, run_id: str) -> tuple[str, str | None, Any]:
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(billing_runs.c.status, billing_runs.c.error, billing_runs.c.finished_at).where(
                billing_runs.c.run_id == run_id
            )
        ).one()
    return row.status, row.error, row.finished_at


def kill(engine: sa.Engine, held: Lease) -> None:
    """The holder dies. PostgreSQL: its lock session ends. SQLite: its process is gone
    (the row now names a pid that exited, recorded with its start time while it ran)."""
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            assert conn.execute(sa.select(sa.func.pg_terminate_backend(held.session_pid))).scalar_one()
        for _ in range(500):  # the server ends the session within milliseconds
            with engine.connect() as conn:
                if not any(h.alive and h.run_id == held.run_id for h in read_holders(conn)):
                    break
            time.sleep(0.02)
        else:
            raise AssertionError("the terminated session still holds its lock")
        drop_session(held)
    else:
        assert held._heartbeat is not None
        held._heartbeat.stop()
        gone = subprocess.Popen(["sleep", "30"])
        key = process_key(gone.pid)
        gone.kill()
        gone.wait()
        with engine.begin() as conn:
            conn.execute(
                sa.update(billing_locks)
                .where(billing_locks.c.run_id == held.run_id)
                .values(pid=gone.pid, process_key=key)
            )
    leases.remove(held)


def drop_session(held: Lease) -> None:
    """Close this side of a lock session the server ended."""
    session, held._session = held._session, None
    assert session is not None
    session.invalidate()
    session.close()


# ---------------------------------------------------------------------------
# Acquire, hold, release
# ---------------------------------------------------------------------------


def test_a_free_lock_is_taken_recorded_with_its_holder_and_released(engine: sa.Engine) -> None:
    a = lease(engine, "run-a", host="host-a", pid=4242)
    a.acquire(T0)
    row = lock_row(engine)
    assert (row.run_id, row.host, row.pid, row.acquired_at) == ("run-a", "host-a", 4242, T0)
    if engine.dialect.name == "postgresql":
        assert row.expires_at is None
        assert row.session_pid == a.session_pid != 0
    else:
        assert row.expires_at is not None
        assert row.session_pid is None
    a.release()
    assert lock_row(engine) is None
    taken(lease(engine, "run-b"))
    assert lock_row(engine).run_id == "run-b"


def test_a_second_run_meets_a_live_holder_and_is_told_who_it_is(engine: sa.Engine) -> None:
    taken(lease(engine, "run-a", host="host-a", pid=4242))
    with pytest.raises(LockHeld) as held:
        lease(engine, "run-b").acquire(T0)
    assert (held.value.run_id, held.value.host, held.value.pid) == ("run-a", "host-a", 4242)
    assert str(held.value) == (
        "another run holds the lock 'billing-writer' (run run-a on host-a, pid 4242) "
        "since 2026-06-01 04:00:00 UTC"
    )
    assert lock_row(engine).run_id == "run-a"


@pytest.mark.parametrize(
    ("held_names", "wanted", "allowed"),
    [
        ([(0, 2)], (1, 2), True),  # shards of one split run at once
        ([(0, 2)], (0, 2), False),  # one process per shard
        ([(0, 2)], (1, 3), False),  # shards of another split
        ([(0, 2)], None, False),  # a whole run while a shard runs
        ([None], (0, 2), False),  # a shard while a whole run runs
        ([None], None, False),
    ],
)
def test_shards_of_one_split_share_the_writer_and_anything_else_excludes(
    engine: sa.Engine,
    held_names: list[tuple[int, int] | None],
    wanted: tuple[int, int] | None,
    allowed: bool,
) -> None:
    for i, shard in enumerate(held_names):
        taken(lease(engine, f"held-{i}", writer_lock_name(*(shard or ()))))
    want = lease(engine, "wanted", writer_lock_name(*(wanted or ())))
    if allowed:
        taken(want)
        assert lock_row(engine, want.name).run_id == "wanted"
    else:
        with pytest.raises(LockHeld) as held:
            want.acquire(T0)
        assert held.value.run_id.startswith("held-")
        assert lock_row(engine, want.name) is None or lock_row(engine, want.name).run_id != "wanted"


def test_the_lock_of_a_dead_holder_is_taken_at_once_and_its_run_marked_abandoned(engine: sa.Engine) -> None:
    record_run(engine, "run-dead")
    record_run(engine, "run-finished", status="succeeded")
    dead = taken(lease(engine, "run-dead"))
    kill(engine, dead)

    finder = taken(lease(engine, "run-new"))

    assert lock_row(engine).run_id == "run-new"
    status, error, finished_at = run_status(engine, "run-dead")
    assert status == "abandoned"
    assert finished_at == T0
    assert error is not None
    assert "died holding the lock 'billing-writer'" in error
    assert error.endswith(f"found by run {finder.run_id}")
    assert run_status(engine, "run-finished")[0] == "succeeded"


def test_a_dead_shard_is_cleared_by_a_whole_run_that_its_lock_no_longer_excludes(engine: sa.Engine) -> None:
    record_run(engine, "shard-dead")
    dead = taken(lease(engine, "shard-dead", writer_lock_name(1, 2)))
    kill(engine, dead)
    taken(lease(engine, "whole"))
    assert lock_row(engine, writer_lock_name(1, 2)) is None
    assert run_status(engine, "shard-dead")[0] == "abandoned"


def test_a_dead_holder_has_no_way_to_write_any_more(engine: sa.Engine) -> None:
    """Its workers, which write with its lease, write nothing once it died: before any
    takeover (SQLite: its row names a process that is gone) and after one."""
    a = taken(lease(engine, "run-a"))
    write_as(a, "2026-05-01")
    kill(engine, a)
    with pytest.raises(LockLost, match="nothing committed"):
        write_as(a, "2026-05-02")
    taken(lease(engine, "run-b"))
    with pytest.raises(LockLost):
        write_as(a, "2026-05-03")
    assert days_marked(engine) == ["2026-05-01"]


# ---------------------------------------------------------------------------
# SQLite: processes and leases
# ---------------------------------------------------------------------------


def test_a_process_is_told_from_a_later_one_with_the_same_pid(tmp_path: Any) -> None:
    mine = process_key(os.getpid())
    assert mine is not None
    assert process_alive(HERE, os.getpid(), mine) is True
    namespace = mine.rpartition("/")[0]
    assert process_alive(HERE, os.getpid(), f"{namespace}/1") is False  # same pid, other start
    gone = subprocess.Popen(["sleep", "30"])
    key = process_key(gone.pid)
    gone.kill()
    gone.wait()
    assert process_alive(HERE, gone.pid, key) is False
    assert process_alive("another-host", os.getpid(), mine) is None  # cannot tell: the lease decides
    assert process_alive(HERE, os.getpid(), "other-boot:pid:[1]/5") is None
    assert process_alive(HERE, os.getpid(), None) is None


@pytest.fixture
def sqlite_engine(tmp_path: Any) -> Iterator[sa.Engine]:
    yield from upgraded(f"sqlite:///{tmp_path / 'billing.db'}")


def test_sqlite_a_holder_elsewhere_keeps_its_lease_by_its_heartbeat_past_its_length(
    sqlite_engine: sa.Engine,
) -> None:
    a = taken(lease(sqlite_engine, "run-a", host="elsewhere", pid=1, seconds=1))
    first = lock_row(sqlite_engine).expires_at
    time.sleep(2.5)  # past the lease: only the heartbeat keeps it
    with pytest.raises(LockHeld):
        lease(sqlite_engine, "run-b").acquire(T0)
    assert lock_row(sqlite_engine).expires_at > first
    a.release()


def test_sqlite_a_lease_is_on_the_database_clock_not_the_host_clock(sqlite_engine: sa.Engine) -> None:
    taken(lease(sqlite_engine, "run-a", host="elsewhere", pid=1))
    later = datetime.now(UTC) + timedelta(days=1)
    with time_machine.travel(later, tick=False), pytest.raises(LockHeld):
        lease(sqlite_engine, "run-b").acquire(T0)


def test_sqlite_a_lease_elsewhere_that_stopped_beating_expires_and_is_taken_over(
    sqlite_engine: sa.Engine,
) -> None:
    record_run(sqlite_engine, "run-a")
    a = taken(lease(sqlite_engine, "run-a", host="elsewhere", pid=1, seconds=1))
    assert a._heartbeat is not None
    a._heartbeat.stop()  # its host vanished
    leases.remove(a)
    time.sleep(1.2)
    taken(lease(sqlite_engine, "run-b"))
    assert run_status(sqlite_engine, "run-a")[0] == "abandoned"


def test_sqlite_a_holder_alive_on_this_host_keeps_its_lock_past_an_expired_lease(
    sqlite_engine: sa.Engine,
) -> None:
    a = taken(lease(sqlite_engine, "run-a", seconds=1))
    assert a._heartbeat is not None
    a._heartbeat.stop()  # its thread starved, say: the process still runs
    time.sleep(1.2)
    with pytest.raises(LockHeld):
        lease(sqlite_engine, "run-b").acquire(T0)


# ---------------------------------------------------------------------------
# Races
# ---------------------------------------------------------------------------


class Attempt(threading.Thread):
    """Runs `action` on its own thread; records what it returned or raised."""

    def __init__(self, action: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.action = action
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.action()
        except BaseException as exc:
            self.error = exc


def contend(gate: threading.Barrier, held: Lease) -> Callable[[], None]:
    def go() -> None:
        gate.wait(30)
        held.acquire(T0)

    return go


def test_runs_racing_for_the_writer_locks_never_hold_excluding_ones_at_once(db_url: str) -> None:
    names = [None, (0, 2), (1, 2), (0, 3), None]
    engines = [make_engine(db_url) for _ in names]
    upgrade(engines[0])
    try:
        for _round in range(3):
            gate = threading.Barrier(len(names))
            mine = [lease(engines[i], f"run-{i}", writer_lock_name(*(n or ()))) for i, n in enumerate(names)]
            attempts = [Attempt(contend(gate, m)) for m in mine]
            for t in attempts:
                t.start()
            for t in attempts:
                t.join(60)
            winners = [m for m, t in zip(mine, attempts, strict=True) if t.error is None]
            assert all(isinstance(t.error, LockHeld) for t in attempts if t.error is not None)
            assert winners
            won = {w.name for w in winners}
            assert len(won) == len(winners)
            assert won in (
                {WRITER_LOCK},
                {writer_lock_name(0, 2), writer_lock_name(1, 2)},
                {writer_lock_name(0, 2)},
                {writer_lock_name(1, 2)},
                {writer_lock_name(0, 3)},
            )
            for w in winners:
                w.release()
    finally:
        for e in engines:
            e.dispose()


def wait_until_blocked(engine: sa.Engine, attempt: Attempt) -> None:
    """Return once `attempt` waits for a lock in PostgreSQL."""
    query = sa.text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    for _ in range(1500):
        with engine.connect() as conn:
            if conn.execute(query).scalar_one():
                return
        assert attempt.is_alive(), f"the taker did not wait: {attempt.error!r}"
        attempt.join(0.02)
    raise AssertionError("the taker never waited for the open write")


def test_postgresql_a_takeover_waits_for_a_write_of_the_dead_holder_still_in_flight(pg_db_url: str) -> None:
    holder_engine, rival_engine = make_engine(pg_db_url), make_engine(pg_db_url)
    try:
        upgrade(holder_engine)
        a = lease(holder_engine, "run-a")
        a.acquire(T0)
        rival = Attempt(lambda: lease(rival_engine, "run-b").acquire(T0))
        with holder_engine.begin() as conn:  # a worker's write, proven while the holder lived
            a.assert_held(conn)
            mark_day(conn, "2026-05-01", "run-a")
            with rival_engine.begin() as other:
                other.execute(sa.select(sa.func.pg_terminate_backend(a.session_pid)))
            time.sleep(0.2)
            rival.start()
            wait_until_blocked(rival_engine, rival)
            assert lock_row(rival_engine).run_id == "run-a"
        rival.join(60)
        assert rival.error is None, rival.error
        assert lock_row(holder_engine).run_id == "run-b"
        assert days_marked(holder_engine) == ["2026-05-01"]
        with pytest.raises(LockLost):
            write_as(a, "2026-05-02")
        assert days_marked(holder_engine) == ["2026-05-01"]
        drop_session(a)
    finally:
        holder_engine.dispose()
        rival_engine.dispose()


# ---------------------------------------------------------------------------
# run_job: the frame every writing job runs in
# ---------------------------------------------------------------------------


def test_a_job_holds_the_lock_while_it_works_and_releases_it_when_done(engine: sa.Engine) -> None:
    seen: list[str] = []

    def body(run: Run) -> None:
        seen.append(lock_row(engine).run_id)
        run.write(lambda conn: mark_day(conn, "2026-05-01", run.run_id))

    outcome = run_job(engine, Settings(), "nightly", period="p", arguments={}, body=body, now=T0)
    assert seen == [outcome.run_id]
    assert lock_row(engine) is None
    assert run_status(engine, outcome.run_id)[:2] == ("succeeded", None)


def test_a_job_started_while_another_holds_the_lock_runs_nothing_and_is_recorded_as_locked(
    engine: sa.Engine,
) -> None:
    taken(lease(engine, "run-a", host="host-a"))
    ran: list[bool] = []
    with pytest.raises(LockHeld):
        run_job(engine, Settings(), "nightly", period="p", arguments={}, body=ran.append, now=T0)
    assert ran == []
    assert lock_row(engine).run_id == "run-a"
    with engine.connect() as conn:
        (status, error), *more = conn.execute(
            sa.select(billing_runs.c.status, billing_runs.c.error).where(billing_runs.c.job == "nightly")
        ).all()
    assert more == []
    assert status == "locked"
    assert "run-a" in error


def test_a_job_that_loses_its_lock_mid_run_fails_and_commits_nothing_more(engine: sa.Engine) -> None:
    def body(run: Run) -> None:
        run.write(lambda conn: mark_day(conn, "2026-05-01", run.run_id))
        assert run.lease is not None
        if engine.dialect.name == "postgresql":  # its lock session is cut off, and gone
            with engine.begin() as conn:  # (the call waits up to 10 s for the session's end)
                conn.execute(sa.select(sa.func.pg_terminate_backend(run.lease.session_pid, 10_000)))
        else:  # another run took the row over
            with engine.begin() as conn:
                conn.execute(sa.update(billing_locks).values(run_id="run-rival"))
        run.write(lambda conn: mark_day(conn, "2026-05-02", run.run_id))

    with pytest.raises(LockLost):
        run_job(engine, Settings(), "month-end", period="2026-05", arguments={}, body=body, now=T0)
    assert days_marked(engine) == ["2026-05-01"]
    with engine.connect() as conn:
        status, error = conn.execute(
            sa.select(billing_runs.c.status, billing_runs.c.error).where(billing_runs.c.job == "month-end")
        ).one()
    assert status == "failed"
    assert error.startswith("LockLost")


@pytest.fixture
def pg_engine(pg_db_url: str) -> Iterator[sa.Engine]:
    yield from upgraded(pg_db_url)


def test_postgresql_a_taker_waits_a_moment_for_the_session_of_a_holder_whose_process_is_gone(
    pg_engine: sa.Engine,
) -> None:
    """The process died (this host can tell by its pid) but the server has not ended its
    session yet: the taker waits for it instead of exiting 75."""
    dying = taken(lease(pg_engine, "run-dying"))
    leases.remove(dying)
    gone = subprocess.Popen(["sleep", "30"])
    key = process_key(gone.pid)
    gone.kill()
    gone.wait()
    with pg_engine.begin() as conn:
        conn.execute(sa.update(billing_locks).values(pid=gone.pid, process_key=key))

    def end_session() -> None:
        time.sleep(0.5)
        with pg_engine.begin() as conn:
            conn.execute(sa.select(sa.func.pg_terminate_backend(dying.session_pid)))

    ender = Attempt(end_session)
    started = time.monotonic()
    ender.start()
    taken(lease(pg_engine, "run-next"))
    assert 0.4 < time.monotonic() - started < 5
    ender.join(10)
    assert lock_row(pg_engine).run_id == "run-next"
    drop_session(dying)
