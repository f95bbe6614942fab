"""The writer lock (db/lock.py): a lease row, taken atomically, renewed in each write.

Time is a parameter of `acquire` and `assert_held`, so expiry is tested by passing
later instants, never by waiting. The races (a takeover against a renewal in an
open transaction) run in two threads on two connections of the real database.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from billing_jobs.db.billing_tables import billed_days, billing_locks, billing_runs
from billing_jobs.db.engine import make_engine, upgrade
from billing_jobs.db.lock import WRITER_LOCK, Lease, LockHeld, LockLost
from billing_jobs.jobs.runner import Run, run_job
from billing_jobs.settings import Settings

T0 = datetime.fromisoformat("2026-06-01 04:00:00")  # naive UTC, like the jobs' clock
LEASE = 60


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    eng = make_engine(db_url)
    upgrade(eng)
    try:
        yield eng
    finally:
        eng.dispose()


def lease(engine: sa.Engine, run_id: str, seconds: int = LEASE) -> Lease:
    return Lease(engine, WRITER_LOCK, run_id, f"host-{run_id}", 4242, seconds)


def lock_row(engine: sa.Engine) -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.select(billing_locks).where(billing_locks.c.name == WRITER_LOCK)).first()


def mark_day(conn: sa.Connection, day: str, run_id: str) -> None:
    """A stand-in for a job's write: one row in one of the jobs' tables."""
    conn.execute(
        billed_days.insert().values(
            billing_day=datetime.fromisoformat(day).date(), run_id=run_id, billed_at=T0
        )
    )


def write_as(
    holder: Lease, now: datetime, *days: str, fail_after_renewal: bool = False, renew_first: bool = True
) -> None:
    """One write transaction of `holder`: renew the lease (first or last) and mark `days`."""
    with holder.engine.begin() as conn:
        if renew_first:
            holder.assert_held(conn, now)
        for day in days:
            mark_day(conn, day, holder.run_id)
        if not renew_first:
            holder.assert_held(conn, now)
        if fail_after_renewal:
            raise ZeroDivisionError("the work failed")


def days_marked(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return [
            str(d)
            for (d,) in conn.execute(sa.select(billed_days.c.billing_day).order_by(billed_days.c.billing_day))
        ]


# ---------------------------------------------------------------------------
# Acquire, hold, release, expire
# ---------------------------------------------------------------------------


def test_a_free_lock_is_acquired_recorded_with_its_holder_and_released(engine: sa.Engine) -> None:
    a = lease(engine, "run-a")
    a.acquire(T0)
    row = lock_row(engine)
    assert (row.run_id, row.host, row.pid) == ("run-a", "host-run-a", 4242)
    assert (row.acquired_at, row.expires_at) == (T0, T0 + timedelta(seconds=LEASE))
    a.release()
    assert lock_row(engine) is None


def test_a_second_acquire_while_the_lease_is_held_raises_lock_held_naming_the_holder(
    engine: sa.Engine,
) -> None:
    lease(engine, "run-a").acquire(T0)
    with pytest.raises(LockHeld) as held:
        lease(engine, "run-b").acquire(T0 + timedelta(seconds=LEASE - 1))
    assert (held.value.run_id, held.value.host, held.value.pid) == ("run-a", "host-run-a", 4242)
    assert held.value.expires_at == T0 + timedelta(seconds=LEASE)
    assert "run-a" in str(held.value)
    assert "host-run-a" in str(held.value)
    assert "2026-06-01 04:01:00" in str(held.value)
    assert lock_row(engine).run_id == "run-a"


def test_the_lock_is_free_again_once_its_holder_released_it(engine: sa.Engine) -> None:
    a = lease(engine, "run-a")
    a.acquire(T0)
    a.release()
    lease(engine, "run-b").acquire(T0 + timedelta(seconds=1))
    assert lock_row(engine).run_id == "run-b"


def test_an_expired_lease_is_taken_over_by_the_next_run(engine: sa.Engine) -> None:
    lease(engine, "run-a").acquire(T0)
    later = T0 + timedelta(seconds=LEASE + 1)
    lease(engine, "run-b").acquire(later)
    row = lock_row(engine)
    assert (row.run_id, row.host, row.acquired_at) == ("run-b", "host-run-b", later)
    assert row.expires_at == later + timedelta(seconds=LEASE)


def test_a_lease_is_held_up_to_its_expiry_instant_inclusive(engine: sa.Engine) -> None:
    lease(engine, "run-a").acquire(T0)
    with pytest.raises(LockHeld):
        lease(engine, "run-b").acquire(T0 + timedelta(seconds=LEASE))
    assert lock_row(engine).run_id == "run-a"


def test_releasing_a_lease_that_was_taken_over_leaves_the_new_holder_alone(engine: sa.Engine) -> None:
    a = lease(engine, "run-a")
    a.acquire(T0)
    lease(engine, "run-b").acquire(T0 + timedelta(seconds=LEASE + 1))
    a.release()
    assert lock_row(engine).run_id == "run-b"


# ---------------------------------------------------------------------------
# Renewal inside the write transaction
# ---------------------------------------------------------------------------


def test_a_write_renews_the_lease_so_it_is_not_taken_over_at_its_first_expiry(engine: sa.Engine) -> None:
    a = lease(engine, "run-a")
    a.acquire(T0)
    write_as(a, T0 + timedelta(seconds=LEASE - 10), "2026-05-01")
    with pytest.raises(LockHeld):
        lease(engine, "run-b").acquire(T0 + timedelta(seconds=LEASE + 1))
    assert lock_row(engine).expires_at == T0 + timedelta(seconds=2 * LEASE - 10)


def test_a_holder_whose_expired_lease_nobody_took_renews_it_and_commits(engine: sa.Engine) -> None:
    a = lease(engine, "run-a")
    a.acquire(T0)
    write_as(a, T0 + timedelta(seconds=LEASE + 30), "2026-05-01")
    assert days_marked(engine) == ["2026-05-01"]
    assert lock_row(engine).run_id == "run-a"


def test_a_write_that_rolls_back_commits_nothing_and_its_renewal_only_on_postgresql(
    engine: sa.Engine,
) -> None:
    """SQLite renews inside the write transaction; PostgreSQL renews in a transaction of its
    own (so that a run's workers can write at once), which stands after a rollback."""
    a = lease(engine, "run-a")
    a.acquire(T0)
    at = T0 + timedelta(seconds=LEASE - 10)
    with pytest.raises(ZeroDivisionError):
        write_as(a, at, "2026-05-01", fail_after_renewal=True)
    renewed = engine.dialect.name == "postgresql"
    expires = (at if renewed else T0) + timedelta(seconds=LEASE)
    assert lock_row(engine).expires_at == expires
    lease(engine, "run-b").acquire(expires + timedelta(seconds=1))
    assert lock_row(engine).run_id == "run-b"
    assert days_marked(engine) == []


def test_a_run_whose_lease_was_taken_over_cannot_commit(engine: sa.Engine) -> None:
    a = lease(engine, "run-a")
    a.acquire(T0)
    write_as(a, T0 + timedelta(seconds=10), "2026-05-01")
    lease(engine, "run-b").acquire(T0 + timedelta(seconds=10 + LEASE + 1))
    with pytest.raises(LockLost, match="taken over"):
        write_as(a, T0 + timedelta(seconds=10 + LEASE + 2), "2026-05-02", "2026-05-03", renew_first=False)
    assert days_marked(engine) == ["2026-05-01"]
    assert lock_row(engine).run_id == "run-b"


def test_a_run_whose_lease_was_released_cannot_commit(engine: sa.Engine) -> None:
    a = lease(engine, "run-a")
    a.acquire(T0)
    a.release()
    with pytest.raises(LockLost):
        write_as(a, T0 + timedelta(seconds=1), "2026-05-01")
    assert days_marked(engine) == []
    assert lock_row(engine) is None


# ---------------------------------------------------------------------------
# Races between two connections: the renewal and the takeover are serialized
# ---------------------------------------------------------------------------


class Attempt(threading.Thread):
    """Runs `action` on its own thread; records what it returned or raised."""

    def __init__(self, action: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.action = action
        self.started_sql = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.action()
        except BaseException as exc:
            self.error = exc


def watch_statements(engine: sa.Engine, attempt: Attempt) -> None:
    """Set `attempt.started_sql` when `engine` sends its first statement."""

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _seen(*_args: Any) -> None:
        attempt.started_sql.set()


def wait_until_blocked(engine: sa.Engine, attempt: Attempt) -> None:
    """Return once `attempt` is inside a statement that must wait for the open transaction.

    PostgreSQL: its backend shows a lock wait in pg_stat_activity. SQLite: it sent
    a write statement while another connection holds the database's write lock,
    so that statement cannot complete before the holder ends its transaction.
    """
    assert attempt.started_sql.wait(30), "the competing statement never started"
    if engine.dialect.name != "postgresql":
        return
    query = sa.text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    for _ in range(1500):
        with engine.connect() as conn:
            if conn.execute(query).scalar_one():
                return
        assert attempt.is_alive(), f"the competing statement did not wait: {attempt.error!r}"
        attempt.join(0.02)
    raise AssertionError("the competing statement never waited for the open transaction")


def test_a_takeover_waits_for_an_open_write_and_then_finds_the_lease_held_or_expired(db_url: str) -> None:
    holder_engine, rival_engine = make_engine(db_url), make_engine(db_url)
    try:
        upgrade(holder_engine)
        a = lease(holder_engine, "run-a")
        a.acquire(T0)
        expired = T0 + timedelta(seconds=LEASE + 5)
        rival = Attempt(lambda: lease(rival_engine, "run-b").acquire(expired + timedelta(seconds=1)))
        watch_statements(rival_engine, rival)
        if holder_engine.dialect.name == "postgresql":
            # The write transaction holds the lease row FOR KEY SHARE: a takeover of the
            # lease (expired meanwhile) waits until the write commits, then takes it.
            later = expired + timedelta(seconds=LEASE + 1)  # past the renewal of the write below
            rival = Attempt(lambda: lease(rival_engine, "run-b").acquire(later))
            watch_statements(rival_engine, rival)
            with holder_engine.begin() as conn:
                a.assert_held(conn, expired)
                mark_day(conn, "2026-05-01", "run-a")
                rival.start()
                wait_until_blocked(holder_engine, rival)
            rival.join(60)
            assert rival.error is None, rival.error
            assert lock_row(holder_engine).run_id == "run-b"
            assert days_marked(holder_engine) == ["2026-05-01"]  # written while run-a held it
            return
        with holder_engine.begin() as conn:
            a.assert_held(conn, expired)  # the lease had expired; nobody took it yet
            mark_day(conn, "2026-05-01", "run-a")
            rival.start()
            wait_until_blocked(holder_engine, rival)
        rival.join(60)
        assert isinstance(rival.error, LockHeld), rival.error
        assert rival.error.run_id == "run-a"
        assert lock_row(holder_engine).run_id == "run-a"
        assert days_marked(holder_engine) == ["2026-05-01"]
    finally:
        holder_engine.dispose()
        rival_engine.dispose()


def test_a_renewal_waits_for_an_open_takeover_and_then_finds_the_lease_lost(db_url: str) -> None:
    holder_engine, rival_engine = make_engine(db_url), make_engine(db_url)
    try:
        upgrade(holder_engine)
        a = lease(holder_engine, "run-a")
        a.acquire(T0)
        expired = T0 + timedelta(seconds=LEASE + 5)

        holder = Attempt(lambda: write_as(a, expired + timedelta(seconds=1), "2026-05-01"))
        watch_statements(holder_engine, holder)
        with rival_engine.begin() as conn:
            # The takeover the upsert in `acquire` performs, left uncommitted for a moment.
            taken = conn.execute(
                sa.update(billing_locks)
                .where(billing_locks.c.name == WRITER_LOCK, billing_locks.c.expires_at < expired)
                .values(run_id="run-b", host="host-run-b", acquired_at=expired)
                .values(expires_at=expired + timedelta(seconds=LEASE))
            ).rowcount
            assert taken == 1
            holder.start()
            wait_until_blocked(rival_engine, holder)
        holder.join(60)
        assert isinstance(holder.error, LockLost), holder.error
        assert lock_row(holder_engine).run_id == "run-b"
        assert days_marked(holder_engine) == []
    finally:
        holder_engine.dispose()
        rival_engine.dispose()


def test_two_runs_racing_for_a_free_lock_get_it_once(db_url: str) -> None:
    engines = [make_engine(db_url) for _ in range(4)]
    try:
        upgrade(engines[0])
        gate = threading.Barrier(len(engines))

        def contend(i: int) -> Callable[[], None]:
            def go() -> None:
                gate.wait(30)
                lease(engines[i], f"run-{i}").acquire(T0)

            return go

        attempts = [Attempt(contend(i)) for i in range(len(engines))]
        for t in attempts:
            t.start()
        for t in attempts:
            t.join(60)
        winners = [i for i, t in enumerate(attempts) if t.error is None]
        assert len(winners) == 1, [t.error for t in attempts]
        assert all(isinstance(t.error, LockHeld) for i, t in enumerate(attempts) if i not in winners)
        assert lock_row(engines[0]).run_id == f"run-{winners[0]}"
    finally:
        for e in engines:
            e.dispose()


# ---------------------------------------------------------------------------
# run_job: the frame every writing job runs in
# ---------------------------------------------------------------------------


def run_status(engine: sa.Engine, run_id: str) -> tuple[str, str | None]:
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(billing_runs.c.status, billing_runs.c.error).where(billing_runs.c.run_id == run_id)
        ).one()
    return row.status, row.error


def test_a_job_holds_the_lock_while_it_works_and_releases_it_when_done(engine: sa.Engine) -> None:
    seen: list[str] = []

    def body(run: Run) -> None:
        seen.append(lock_row(engine).run_id)
        run.write(lambda conn: mark_day(conn, "2026-05-01", run.run_id))

    outcome = run_job(engine, Settings(), "nightly", period="p", arguments={}, body=body, now=T0)
    assert seen == [outcome.run_id]
    assert lock_row(engine) is None
    assert run_status(engine, outcome.run_id) == ("succeeded", None)


def test_a_job_started_while_another_holds_the_lock_runs_nothing_and_is_recorded_as_locked(
    engine: sa.Engine,
) -> None:
    holder = lease(engine, "run-a", seconds=3600)
    holder.acquire(datetime.now(UTC).replace(tzinfo=None))  # the runner compares with its naive UTC clock
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


def test_a_job_whose_lease_is_taken_over_mid_run_fails_and_commits_nothing_more(engine: sa.Engine) -> None:
    settings = Settings(lock_lease_seconds=LEASE)
    rival = lease(engine, "run-rival", seconds=3600)

    def body(run: Run) -> None:
        run.write(lambda conn: mark_day(conn, "2026-05-01", run.run_id))
        # The run stalls past its lease and another run takes the lock over.
        stalled_until = lock_row(engine).expires_at + timedelta(seconds=1)
        rival.acquire(stalled_until)
        run.write(lambda conn: mark_day(conn, "2026-05-02", run.run_id))

    with pytest.raises(LockLost):
        run_job(engine, settings, "month-end", period="2026-05", arguments={}, body=body, now=T0)
    assert days_marked(engine) == ["2026-05-01"]
    assert lock_row(engine).run_id == "run-rival"
    with engine.connect() as conn:
        status, error = conn.execute(
            sa.select(billing_runs.c.status, billing_runs.c.error).where(billing_runs.c.job == "month-end")
        ).one()
    assert status == "failed"
    assert error.startswith("LockLost")
