"""A run that dies at any point, followed by a re-run, leaves what an uninterrupted run leaves.

A job commits in steps (`Run.write`: one transaction per chunk of accounts, plus
its first and last steps). The crash points are these steps: a run dies inside
a write transaction before it commits, or after the last one committed (the
lock release and the run's record not yet done).

- Killed: the job runs as a real process (`python -c` around the production
  command line) that sends itself SIGKILL at the chosen point, so no cleanup
  code runs. Its lock dies with it (PostgreSQL: its session ends; SQLite: its
  pid is gone), so the re-run takes the lock over at once, long before the
  lease of an hour set for it could run out, and marks the killed run
  `abandoned`.
  Killed inside the first three and the last two steps, and after the last.
- Failed: inside every step and after the last, in-process, with an exception
  instead (exit 1): the run releases its lease, and the re-run proceeds at once.

Each scenario runs on a fresh database; the result (invoices, invoice lines,
daily charges, rejects, billed days, closes, export; run ids and timestamps
aside) must equal an uninterrupted run on a copy of the same source data.
"""

from __future__ import annotations

import copy
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from process_runs import (
    another_database,
    billing_state,
    busy_month,
    database_maker,
    finish,
    late_changes,
    lock_holder,
    plain_lines,
    run_records,
    start_cli,
    write_source,
)
from support import run_cli

from billing_jobs.jobs import runner

pytestmark = pytest.mark.slow

MONTH = "2026-05"
ACCOUNTS = 3
# Each account has 3 projects: 3 chunks, so a run commits in at least 5 steps
# (its first step, one per chunk, its last steps).
# One process: the fault hook counts the writes of this process (workers would write elsewhere).
CHUNK_ENV = {"BILLING_PROJECTS_PER_CHUNK": "3", "BILLING_WORKERS": "1"}
MIN_WRITES = 5
LONG_LEASE = 3600  # [lock] lease_seconds of the killed run and its re-run
RERUN_SECONDS = 60  # the re-run, its work included, ends well before any lease could matter
SOURCE = busy_month(ACCOUNTS)
LATE = late_changes()


@dataclass(frozen=True)
class Scenario:
    """What is in the database before the run, and the run that may crash."""

    before: Callable[[str], None]
    command: tuple[str, ...]
    check: Callable[[dict[str, Any]], None]


def _cli(url: str, *args: str) -> None:
    result = run_cli(url, *args, env=CHUNK_ENV)
    assert result.code == 0, result.stderr


def _some_days_billed(url: str) -> None:
    _cli(url, "nightly", "--date", "2026-05-09")


def _month_closed_then_late_data(url: str) -> None:
    _cli(url, "nightly", "--date", "2026-05-09")
    _cli(url, "month-end", "--month", MONTH)
    copy.deepcopy(LATE).write_url(url)


def _charges_a_day(state: dict[str, Any]) -> None:
    assert any(str(row[2]) == "2026-05-10" for row in state["daily_charges"])


def _closes_the_month(state: dict[str, Any]) -> None:
    assert {row[3] for row in state["invoices"]} == {"regular"}
    assert [row[:2] for row in state["month_closes"]] == [(MONTH, 0)]


def _adjusts_the_month(state: dict[str, Any]) -> None:
    assert {row[3] for row in state["invoices"]} == {"regular", "adjustment"}
    assert [row[:2] for row in state["month_closes"]] == [(MONTH, 1)]


SCENARIOS = {
    "nightly": Scenario(_some_days_billed, ("nightly", "--date", "2026-05-10"), _charges_a_day),
    "month-end": Scenario(_some_days_billed, ("month-end", "--month", MONTH), _closes_the_month),
    "re-close": Scenario(_month_closed_then_late_data, ("month-end", "--month", MONTH), _adjusts_the_month),
}

# Where a run dies: inside a write transaction (counted from the first, or from
# the last when negative), or after the last one committed.
CRASH_POINTS = [(1, "before-commit"), (2, "before-commit"), (3, "before-commit")]
CRASH_POINTS += [(-2, "before-commit"), (-1, "before-commit"), (-1, "after-commit")]
POINT_IDS = [
    f"{when}-of-write-{k}" if k > 0 else f"{when}-of-write-{'last' if k == -1 else f'last{k + 1}'}"
    for k, when in CRASH_POINTS
]


def all_points(writes: int) -> list[tuple[int, str]]:
    return [(k, "before-commit") for k in range(1, writes + 1)] + [(writes, "after-commit")]


def prepared(url: str, scenario: Scenario) -> None:
    write_source(SOURCE, url)
    assert run_cli(url, "db", "upgrade").code == 0
    scenario.before(url)


@dataclass(frozen=True)
class Uninterrupted:
    state: dict[str, Any]
    writes: int  # how many write transactions the run commits


_uninterrupted: dict[tuple[str, str], Uninterrupted] = {}


@pytest.fixture
def uninterrupted(request: pytest.FixtureRequest, db_url: str) -> Callable[[str], Uninterrupted]:
    """The state an uninterrupted run of a scenario leaves (computed once per back end)."""
    backend = "sqlite" if db_url.startswith("sqlite") else "postgresql"

    def state_of(name: str) -> Uninterrupted:
        if (backend, name) not in _uninterrupted:
            for url in another_database(request, db_url):
                scenario = SCENARIOS[name]
                prepared(url, scenario)
                writes = count_writes(url, scenario)
                assert writes >= MIN_WRITES, f"the run commits in {writes} steps: too few chunks"
                state = billing_state(url, MONTH)
                scenario.check(state)
                _uninterrupted[backend, name] = Uninterrupted(state, writes)
        return _uninterrupted[backend, name]

    return state_of


def count_writes(url: str, scenario: Scenario) -> int:
    seen = 0
    real_write = runner.Run.write

    def counting(self: runner.Run, work: Callable[..., None]) -> None:
        nonlocal seen
        seen += 1
        real_write(self, work)

    runner.Run.write = counting  # type: ignore[method-assign]
    try:
        _cli(url, *scenario.command)
    finally:
        runner.Run.write = real_write  # type: ignore[method-assign]
    return seen


# ---------------------------------------------------------------------------
# Killed with SIGKILL, in a real process
# ---------------------------------------------------------------------------

# The production command line, with `Run.write` wrapped to kill the process at
# one step: no cleanup, no lock release, no run record; what a power cut does.
DIES_AT_A_WRITE = """
import os, signal, sys
from billing_jobs.jobs import runner

step, when = int(os.environ["DIE_AT_WRITE"]), os.environ["DIE_WHEN"]
seen = 0
real_write = runner.Run.write

def write(self, work):
    global seen
    seen += 1
    if seen == step and when == "before-commit":
        def work_then_die(conn):
            work(conn)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write(self, work_then_die)
    real_write(self, work)
    if seen == step and when == "after-commit":
        os.kill(os.getpid(), signal.SIGKILL)

runner.Run.write = write
from billing_jobs.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize(("step", "when"), CRASH_POINTS, ids=POINT_IDS)
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_a_run_killed_at_any_step_then_rerun_leaves_what_an_uninterrupted_run_leaves(
    db_url: str,
    tmp_path: Path,
    uninterrupted: Callable[[str], Uninterrupted],
    name: str,
    step: int,
    when: str,
) -> None:
    reference = uninterrupted(name)
    expected = reference.state
    step = step if step > 0 else reference.writes + 1 + step
    scenario = SCENARIOS[name]
    prepared(db_url, scenario)
    before = billing_state(db_url, MONTH)

    # A lease far longer than the test: the re-run must not need it to run out.
    config = tmp_path / "billing.toml"
    config.write_text(f"[lock]\nlease_seconds = {LONG_LEASE}\n", encoding="utf-8")
    env = {**CHUNK_ENV, "BILLING_CONFIG": str(config)}
    dying = start_cli(
        db_url,
        *scenario.command,
        cwd=tmp_path,
        env={**env, "DIE_AT_WRITE": str(step), "DIE_WHEN": when},
        script=DIES_AT_A_WRITE,
    )
    killed = finish(dying)
    assert killed.code == -signal.SIGKILL, killed.stderr
    crashed = billing_state(db_url, MONTH)
    if when == "after-commit":
        assert crashed == expected  # everything was committed; only the run's end is missing
    elif step == 1:
        assert crashed == before  # the torn first transaction left nothing
    assert lock_holder(db_url).pid == dying.pid  # the dead run's lock row is still there

    # The lock died with its process: the re-run takes it over at once.
    started = time.monotonic()
    rerun = run_cli(db_url, *scenario.command, env=env)
    assert rerun.code == 0, rerun.stderr
    assert time.monotonic() - started < RERUN_SECONDS
    assert billing_state(db_url, MONTH) == expected
    assert lock_holder(db_url) is None
    runs = run_records(db_url)
    [dead] = [r for r in runs if r["pid"] == dying.pid]
    finder = runs[-1]  # the re-run
    assert dead["status"] == "abandoned"
    assert dead["error"].endswith(f"found by run {finder['run_id']}")
    assert finder["status"] == "succeeded"


# ---------------------------------------------------------------------------
# Failed with an error, in-process: the run releases the lock and reports exit 1
# ---------------------------------------------------------------------------


class InjectedFault(RuntimeError):
    pass


def failing_at(step: int, when: str) -> Callable[..., None]:
    seen = 0
    real_write = runner.Run.write

    def write(self: runner.Run, work: Callable[..., None]) -> None:
        nonlocal seen
        seen += 1
        if seen == step and when == "before-commit":

            def work_then_fail(conn: Any) -> None:
                work(conn)
                raise InjectedFault(f"fault injected in write {step}")

            real_write(self, work_then_fail)
            return
        real_write(self, work)
        if seen == step and when == "after-commit":
            raise InjectedFault(f"fault injected after write {step}")

    return write


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_a_run_failing_at_any_step_then_rerun_at_once_leaves_what_an_uninterrupted_run_leaves(
    request: pytest.FixtureRequest,
    db_url: str,
    uninterrupted: Callable[[str], Uninterrupted],
    monkeypatch: pytest.MonkeyPatch,
    name: str,
) -> None:
    reference = uninterrupted(name)
    expected = reference.state
    scenario = SCENARIOS[name]
    for make in database_maker(request, db_url):
        for step, when in all_points(reference.writes):
            url = make()
            prepared(url, scenario)
            with monkeypatch.context() as patch:
                patch.setattr(runner.Run, "write", failing_at(step, when))
                failed = run_cli(url, *scenario.command, env=CHUNK_ENV)
            assert failed.code == 1, (step, when, failed.stderr)
            where = "in" if when == "before-commit" else "after"
            message = f"billing-jobs: failed: InjectedFault: fault injected {where} write {step}"
            assert plain_lines(failed.stderr) == [message]
            assert lock_holder(url) is None, "a failed run releases its lock"
            rerun = run_cli(url, *scenario.command, env=CHUNK_ENV)
            assert rerun.code == 0, rerun.stderr
            assert billing_state(url, MONTH) == expected, (step, when)
