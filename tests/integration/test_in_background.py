"""`InBackground`: a job's side read runs on its own thread and connection; its
result or its error reaches the job's thread. A run that fails before it asked for
the result cancels the read and closes its connection before it ends, so no
connection is left open for the garbage collector (on either back end)."""

from __future__ import annotations

import threading
import time

import pandas as pd
import pytest
import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from billing_jobs.jobs.compute import InBackground


class Counted:
    """An engine whose connections in use are counted (pool checkouts minus checkins)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.out = 0
        sa.event.listen(engine, "checkout", self._checkout)
        sa.event.listen(engine, "checkin", self._checkin)

    def _checkout(self, *_: object) -> None:
        self.out += 1

    def _checkin(self, *_: object) -> None:
        self.out -= 1


@pytest.fixture
def engine(db_engine: Engine) -> Engine:
    return db_engine


@pytest.fixture
def counted(engine: Engine) -> Counted:
    return Counted(engine)


def _endless(conn: Connection) -> str:
    """A statement that runs for minutes unless it is cancelled."""
    if conn.dialect.name == "postgresql":
        return "SELECT pg_sleep(600)"
    return (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 10000000000) "
        "SELECT count(*) FROM n"
    )


def test_the_result_is_what_the_work_read_on_another_thread_and_connection(
    engine: Engine, counted: Counted
) -> None:
    seen: list[str] = []

    def work(conn: Connection) -> pd.DataFrame:
        seen.append(threading.current_thread().name)
        return pd.DataFrame({"n": [conn.execute(sa.text("SELECT 1 + 1")).scalar_one()]})

    with InBackground(engine, work) as side:
        assert side.result()["n"].tolist() == [2]
    assert seen == ["billing-side-read"]
    assert counted.out == 0


def test_an_error_of_the_work_is_raised_by_result_in_the_callers_thread(
    engine: Engine, counted: Counted
) -> None:
    def work(conn: Connection) -> pd.DataFrame:
        conn.execute(sa.text("SELECT no_such_column FROM no_such_table"))
        return pd.DataFrame()

    with InBackground(engine, work) as side, pytest.raises(sa.exc.DBAPIError):
        side.result()
    assert counted.out == 0


def test_a_run_failing_beside_a_long_read_cancels_it_and_closes_its_connection(
    engine: Engine, counted: Counted
) -> None:
    started = threading.Event()

    def work(conn: Connection) -> pd.DataFrame:
        started.set()
        conn.exec_driver_sql(_endless(conn)).all()
        return pd.DataFrame()

    began = time.monotonic()
    sides: list[InBackground] = []

    def a_run_that_fails() -> None:
        with InBackground(engine, work) as side:
            sides.append(side)
            assert started.wait(10)
            time.sleep(0.2)  # the statement is running
            raise RuntimeError("a chunk failed")

    with pytest.raises(RuntimeError, match="a chunk failed"):
        a_run_that_fails()
    assert not sides[0]._thread.is_alive(), "the side read ended with the run"
    assert time.monotonic() - began < InBackground.STOP_SECONDS
    assert counted.out == 0, "its connection went back before the run ended"


def test_a_failure_before_the_read_started_leaves_no_connection_either(
    engine: Engine, counted: Counted
) -> None:
    def work(conn: Connection) -> pd.DataFrame:
        return pd.DataFrame({"n": [conn.execute(sa.text("SELECT 1")).scalar_one()]})

    sides: list[InBackground] = []

    def a_run_that_fails() -> None:
        with InBackground(engine, work) as side:
            sides.append(side)
            raise RuntimeError("failed at once")

    with pytest.raises(RuntimeError, match="failed at once"):
        a_run_that_fails()
    assert not sides[0]._thread.is_alive()
    assert counted.out == 0
