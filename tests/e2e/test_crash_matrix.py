"""The crash matrix: a run killed (SIGKILL) after EVERY one of its write points.

The fault-injection hook (`billing_jobs.faults`, docs/fault-injection.md) makes the
production command kill itself after its k-th committed write transaction: its run
record, the lease, every chunk and step of the job, the run's end and the lease's
release. A first run with `BILLING_FAULT_TRACE` lists the write points (K of them);
then for every k = 1..K, on a copy of the same database:

1. the run is killed after write k (a real process: forked from the test, no cleanup);
2. the readers (`export`, `explain`, `status --json`, `credits export`,
   `credits report`; for a re-close also support's `credits balance` and
   `credits history`, which must agree with the export) each show the complete
   state before the run or the complete state an uninterrupted run leaves, never a
   half-written month;
3. once the dead run's lease is out of the way, the same command again leaves
   exactly what an uninterrupted run leaves (invoices, lines, charges, rejects,
   closes, the credits ledger tables and the export).

Jobs: nightly catching up four days across a month's end, month-end's first close
and its re-close after late data, and `month-end --approve` of held drafts, each with
the credits ledger in chunks of one account (so every step of the ledger is a kill
point), on SQLite and PostgreSQL.
The re-close is also killed inside each of its data writes, before the commit
(`BILLING_FAULT_KILL_IN_WRITE`). A run of `--workers 2` (real processes) is killed
in its own process after the close is finalized, in a worker after its first
chunk, and in its own process while its workers write (a worker kills it after its
first chunk): then no process of the run is left 5 s later.

Databases are copies of one prepared template per scenario (a file copy on SQLite,
`CREATE DATABASE .. TEMPLATE` on PostgreSQL), so a kill point costs one killed run,
the readers and one re-run.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import multiprocessing
import os
import shutil
import signal
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import time_machine
from process_runs import (
    RUN_TAG,
    billing_state,
    busy_month,
    finish,
    late_changes,
    lock_holder,
    run_tag,
    start_cli,
    wait_for_processes,
)
from psycopg import sql
from support import run_cli

from billing_jobs.db.billing_tables import billing_locks
from billing_jobs.db.lock import WRITER_LOCK
from billing_jobs.rules.calendar import Month

pytestmark = pytest.mark.slow

MONTH = "2026-05"
ACCOUNTS = 3
SOURCE = busy_month(ACCOUNTS)
LATE = late_changes()
# Three accounts of three projects: three chunks a pass; the ledger in chunks of one account.
CHUNKS = {
    "BILLING_PROJECTS_PER_CHUNK": "3",
    "BILLING_LEDGER_ACCOUNTS_PER_CHUNK": "1",
    "BILLING_WORKERS": "1",
}
# Nightly catches up 2026-04-29..2026-05-02 (two months, a pass each) at this instant.
NIGHTLY_CLOCK = "2026-05-03T06:00:00+00:00"
NIGHTLY_SETTINGS = '[storage_fee]\neffective_from = "2026-04-29"\n'
EXPLAINED = "p-001-legacy"  # archived mid-May, charged late compute by the late data


# ---------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    command: tuple[str, ...]
    before: tuple[tuple[str, ...], ...] = ()  # commands run before (the state the run starts from)
    late: bool = False  # late source data arrives after `before`
    clock: str | None = None  # the instant every run and reader sees (else the real clock)
    settings: str | None = None  # a settings file's text
    env: dict[str, str] = field(default_factory=dict)
    ledger_written: bool = False  # the month's ledger is written before the run (support readers)


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("nightly", ("nightly",), clock=NIGHTLY_CLOCK, settings=NIGHTLY_SETTINGS),
        Scenario(
            "month-end",
            ("month-end", "--month", MONTH),
            before=(("nightly", "--date", "2026-05-09"),),
        ),
        Scenario(
            "re-close",
            ("month-end", "--month", MONTH),
            before=(("nightly", "--date", "2026-05-09"), ("month-end", "--month", MONTH)),
            late=True,
            ledger_written=True,
        ),
        Scenario(
            "approve",
            ("month-end", "--approve", MONTH),
            before=(("nightly", "--date", "2026-05-09"), ("month-end", "--month", MONTH, "--hold")),
        ),
    )
}


def _clock(scenario: Scenario) -> AbstractContextManager[Any]:
    return time_machine.travel(scenario.clock, tick=True) if scenario.clock else nullcontext()


def _env(scenario: Scenario, folder: Path, **extra: str) -> dict[str, str]:
    env = {**CHUNKS, **scenario.env, **extra}
    if scenario.settings is not None:
        path = folder / f"settings-{scenario.name}.toml"
        path.write_text(scenario.settings, encoding="utf-8")
        env["BILLING_CONFIG"] = str(path)
    return env


def _cli(url: str, scenario: Scenario, env: dict[str, str], *args: str) -> Any:
    with _clock(scenario):
        return run_cli(url, *args, env=env)


# ---------------------------------------------------------------------------
# Databases: one prepared template per scenario, copied for every kill point
# ---------------------------------------------------------------------------


def _database(url: str) -> str:
    """The database a URL names (a SQLite file's path)."""
    name = sa.make_url(url).database
    assert name, url
    return name


class Databases:
    """Copies of a template database on the back end of the test's `db_url`."""

    def __init__(self, request: pytest.FixtureRequest, db_url: str, folder: Path) -> None:
        self.server = None if db_url.startswith("sqlite") else request.getfixturevalue("pg_server")
        self.folder = folder
        self.made: list[str] = []

    def empty(self) -> str:
        if self.server is None:
            return f"sqlite:///{self.folder / f'db-{uuid.uuid4().hex[:12]}.db'}"
        name = self.server.create_database()
        self.made.append(name)
        return str(self.server.url(name))

    def copy(self, template: str) -> str:
        if self.server is None:
            source = _database(template)
            with sqlite3.connect(source) as conn:  # everything in the main file, WAL emptied
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            target = self.folder / f"db-{uuid.uuid4().hex[:12]}.db"
            shutil.copyfile(source, target)
            return f"sqlite:///{target}"
        name = f"t_{uuid.uuid4().hex}"
        source_name = _database(template)
        with self.server.admin_connection() as conn:
            # Connections that in-process runs left in their pools would block the copy.
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (source_name,),
            )
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(source_name)
                )
            )
        self.made.append(name)
        return str(self.server.url(name))

    def drop(self, url: str) -> None:
        name = _database(url)
        if self.server is None:
            for suffix in ("", "-wal", "-shm"):
                Path(name + suffix).unlink(missing_ok=True)
            return
        self.server.drop_database(name)
        self.made.remove(name)

    def close(self) -> None:
        if self.server is not None:
            for name in self.made:
                self.server.drop_database(name)


@pytest.fixture
def databases(request: pytest.FixtureRequest, db_url: str, tmp_path: Path) -> Iterator[Databases]:
    made = Databases(request, db_url, tmp_path)
    try:
        yield made
    finally:
        made.close()


def prepare(databases: Databases, scenario: Scenario, env: dict[str, str]) -> str:
    url = databases.empty()
    copy.deepcopy(SOURCE).write_url(url)
    assert run_cli(url, "db", "upgrade").code == 0
    for args in scenario.before:
        result = _cli(url, scenario, env, *args)
        assert result.code == 0, result.stderr
    if scenario.late:
        copy.deepcopy(LATE).write_url(url)
    return url


# ---------------------------------------------------------------------------
# The killed run: the production command in a process forked from this one
# ---------------------------------------------------------------------------


def _killed_child(url: str, args: tuple[str, ...], env: dict[str, str], clock: str | None, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    for name in [n for n in os.environ if n.startswith("BILLING_")]:
        del os.environ[name]
    os.environ.update(env)
    if clock:
        time_machine.travel(clock, tick=True).start()
    from billing_jobs.cli import main

    code = 3  # an exception the command line did not turn into an exit status
    try:
        main(["--db-url", url, *args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os._exit(code)  # no cleanup of this process's copy of the test session


def run_killed(url: str, scenario: Scenario, env: dict[str, str], folder: Path) -> tuple[int | None, str]:
    """Run the scenario's command in a child process; its exit code and output.

    The child is forked from this process (no interpreter start-up: the matrix runs
    hundreds of them), or, for runs with worker processes, started afresh (a fork
    would share this process's forkserver).
    """
    if env.get("BILLING_WORKERS") != "1":
        assert scenario.clock is None
        done = finish(start_cli(url, *scenario.command, cwd=folder, env=env))
        return done.code, done.stderr
    log = str(folder / f"killed-{uuid.uuid4().hex[:8]}.log")
    context = multiprocessing.get_context("fork")
    child = context.Process(target=_killed_child, args=(url, scenario.command, env, scenario.clock, log))
    child.start()
    child.join(180)
    if child.exitcode is None:
        child.kill()
        child.join()
    output = Path(log).read_text(encoding="utf-8", errors="replace")
    return child.exitcode, output


def get_past_the_dead_runs_lease(url: str) -> None:
    """The lease a killed run leaves locks the next run out until it expires: expire it.

    (The one place that works around a dead holder's lease.)
    """
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.update(billing_locks)
                .where(billing_locks.c.name == WRITER_LOCK)
                .values(expires_at=datetime(2000, 1, 1))  # noqa: DTZ001 - naive UTC, before any clock
            )
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------
# Write points and readers
# ---------------------------------------------------------------------------


def write_points(url: str, scenario: Scenario, env: dict[str, str], folder: Path) -> list[str]:
    """The labels of the run's write points, in order, from a run in counting mode."""
    trace = folder / f"trace-{uuid.uuid4().hex[:8]}"
    result = _cli(url, scenario, {**env, "BILLING_FAULT_TRACE": str(trace)}, *scenario.command)
    assert result.code == 0, result.stderr
    lines = [line.split() for line in trace.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line[1] == "run"]  # the run's own process
    assert [int(k) for _, _, _, k, _ in lines] == list(range(1, len(lines) + 1))
    return [label for _, _, _, _, label in lines]


def _csv(text: str, drop: str = "") -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k != drop} for row in csv.DictReader(io.StringIO(text))]


def _explained(text: str) -> dict[str, Any]:
    """`explain --json` without draft lines (listed, never counted: a run in progress)."""
    record = json.loads(text)
    record["invoiced"] = [line for line in record["invoiced"] if line["status"] == "finalized"]
    record["notes"] = [n for n in record["notes"] if not n.startswith("draft invoice lines")]
    return dict(record)


def _status(text: str) -> dict[str, Any]:
    """What `status --json` says about billing days and closes (not runs, lock or rejects)."""
    record = json.loads(text)
    return {
        "last_billed_day": record["last_billed_day"],
        "unbilled_days": [d for d in record["unbilled_days"] if d <= "2026-06-30"],
        "last_closed_month": record["last_closed_month"],
        "unclosed_months": [m["period"] for m in record["unclosed_months"] if m["period"] <= "2026-06"],
    }


def _open_rejects(text: str) -> dict[tuple[str, str], int]:
    by_reason = json.loads(text)["open_rejects"]["by_reason"]
    return {(r["source_table"], r["reason"]): int(r["count"]) for r in by_reason}


READERS: dict[str, tuple[tuple[str, ...], Callable[[str], Any]]] = {
    "export": (("export", "--month", MONTH), lambda out: _csv(out, drop="finalized_at")),
    "explain": (("explain", "--project", EXPLAINED, "--month", MONTH, "--json"), _explained),
    "status": (("status", "--json"), _status),
    "credits export": (("credits", "export", "--month", MONTH), lambda out: out),
    "credits report": (("credits", "report", "--month", MONTH), lambda out: out),
}
# Support's view of a written month (before the ledger is written, `credits balance`
# and `credits history` preview it from the source data, finalized invoices included):
# acct-000 gets a late top-up (a new lot), acct-001 late compute.
SUPPORT_READERS: dict[str, tuple[tuple[str, ...], Callable[[str], Any]]] = {
    "credits balance": (
        ("credits", "balance", "--account", "acct-000", "--date", "2026-05-31", "--json"),
        json.loads,
    ),
    "credits balance late compute": (
        ("credits", "balance", "--account", "acct-001", "--date", "2026-05-31", "--json"),
        json.loads,
    ),
    "credits history": (("credits", "history", "--account", "acct-001", "--month", MONTH), lambda out: out),
}


def read_all(url: str, scenario: Scenario, env: dict[str, str]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    readers = {**READERS, **(SUPPORT_READERS if scenario.ledger_written else {})}
    for name, (args, parse) in readers.items():
        result = _cli(url, scenario, env, *args)
        assert result.code in (0, 1), (name, result.stderr)  # status exits 1 on problems
        seen[name] = parse(result.stdout)
        if name == "status":
            seen["rejects"] = _open_rejects(result.stdout)
    return seen


@dataclass(frozen=True)
class Reference:
    template: str
    points: list[str]  # labels of the write points of an uninterrupted run
    state: dict[str, Any]  # what an uninterrupted run leaves
    before: dict[str, Any]  # what the readers show before the run
    after: dict[str, Any]  # what they show after an uninterrupted run


def reference(databases: Databases, scenario: Scenario, env: dict[str, str], folder: Path) -> Reference:
    template = prepare(databases, scenario, env)
    url = databases.copy(template)
    before = read_all(url, scenario, env)
    points = write_points(url, scenario, env, folder)
    state = billing_state(url, MONTH)
    after = read_all(url, scenario, env)
    databases.drop(url)
    return Reference(template, points, state, before, after)


def _whole_months_billed(seen: dict[str, Any], before: dict[str, Any]) -> bool:
    """Nightly commits a month's billing days once every chunk of that month is done:
    between two months, the days are billed through the end of a month."""
    last = seen["last_billed_day"]
    if last is None or Month.of(date.fromisoformat(last)).last_day != date.fromisoformat(last):
        return False
    rest = [d for d in before["unbilled_days"] if d > last]
    return seen == {**before, "last_billed_day": last, "unbilled_days": rest}


def assert_whole(seen: dict[str, Any], ref: Reference, where: str) -> dict[str, str]:
    """Each reader shows the state before or after the run, never one in between;
    rejects (recorded as found, row by row) lie between the two."""
    which = {}
    for name in [*READERS, *(n for n in SUPPORT_READERS if n in seen)]:
        if ref.before[name] == ref.after[name] == seen[name]:
            which[name] = "same"  # the run does not change what this reader shows
        elif seen[name] == ref.before[name]:
            which[name] = "before"
        elif seen[name] == ref.after[name]:
            which[name] = "after"
        elif name == "status" and _whole_months_billed(seen[name], ref.before[name]):
            which[name] = "months"
        else:
            raise AssertionError(
                f"{where}: `{name}` shows a state that is neither before nor after the run:\n"
                f"{seen[name]!r}\nbefore: {ref.before[name]!r}\nafter: {ref.after[name]!r}"
            )
    for key, count in seen["rejects"].items():
        assert ref.before["rejects"].get(key, 0) <= count <= ref.after["rejects"].get(key, 0), (where, key)
    # Support and finance see the same ledger: the account's history and balance show
    # the state the export shows (both before the run, or both after it).
    for support in (n for n in SUPPORT_READERS if n in seen):
        if "same" not in (which[support], which["credits export"]):
            assert which[support] == which["credits export"], (where, support, which)
    return which


def kill_and_rerun(
    databases: Databases,
    scenario: Scenario,
    ref: Reference,
    env: dict[str, str],
    folder: Path,
    kill: dict[str, str],
    where: str,
    killed_code: int = -signal.SIGKILL,
) -> dict[str, str]:
    """Kill a run on a copy of the template, check the readers, re-run, compare."""
    url = databases.copy(ref.template)
    code, output = run_killed(url, scenario, {**env, **kill}, folder)
    assert code == killed_code, f"{where}: exit {code}\n{output}"
    if RUN_TAG in kill:  # no process of the run outlives it (its workers, their fork server)
        left = wait_for_processes(kill, lambda seen: not seen, 5.0)
        assert left == {}, f"{where}: alive 5 s after the run ended: {left}"
    which = assert_whole(read_all(url, scenario, env), ref, where)
    get_past_the_dead_runs_lease(url)
    rerun = _cli(url, scenario, env, *scenario.command)
    assert rerun.code == 0, f"{where}: {rerun.stderr}"
    assert billing_state(url, MONTH) == ref.state, where
    assert lock_holder(url) is None
    databases.drop(url)
    return which


# ---------------------------------------------------------------------------
# The matrix
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_a_run_killed_after_any_write_then_rerun_leaves_what_an_uninterrupted_run_leaves(
    databases: Databases, tmp_path: Path, name: str
) -> None:
    started = time.perf_counter()
    scenario = SCENARIOS[name]
    env = _env(scenario, tmp_path)
    ref = reference(databases, scenario, env, tmp_path)
    points = ref.points
    assert points[:2] == ["run.start", "lock.acquire"]
    assert points[-2:] == ["run.end", "lock.release"]
    # Several chunks (an approval: one write, then the ledger): the matrix is worth its name.
    assert len(points) >= (9 if name == "approve" else 12), points
    if name != "nightly":
        assert points.count("_writer.work") == ACCOUNTS, "the ledger writes one chunk per account"
    assert ref.before != ref.after

    seen = []
    for k, label in enumerate(points, start=1):
        where = f"{name}: killed after write {k}/{len(points)} ({label})"
        kill = {"BILLING_FAULT_KILL_AFTER_WRITE": str(k)}
        seen.append(kill_and_rerun(databases, scenario, ref, env, tmp_path, kill, where))
    # Nothing is visible before the first data write, everything after the last.
    assert set(seen[1].values()) <= {"before", "same"}
    assert set(seen[-3].values()) <= {"after", "same"}
    print(f"{name}: {len(points)} kill points in {time.perf_counter() - started:.1f}s")


def test_a_run_killed_inside_any_write_then_rerun_leaves_what_an_uninterrupted_run_leaves(
    databases: Databases, tmp_path: Path
) -> None:
    """Killed inside each of a re-close's data writes, before its commit: it rolls back."""
    scenario = SCENARIOS["re-close"]
    env = _env(scenario, tmp_path)
    ref = reference(databases, scenario, env, tmp_path)
    inside = [k for k, label in enumerate(ref.points, start=1) if not label.startswith(("run.", "lock."))]
    assert len(inside) >= 8, ref.points
    for k in inside:
        where = f"re-close: killed inside write {k}/{len(ref.points)} ({ref.points[k - 1]})"
        seen = kill_and_rerun(
            databases, scenario, ref, env, tmp_path, {"BILLING_FAULT_KILL_IN_WRITE": str(k)}, where
        )
        if k == inside[0]:
            assert set(seen.values()) <= {"before", "same"}, where


def test_a_run_of_two_workers_killed_then_rerun_leaves_what_an_uninterrupted_run_leaves(
    databases: Databases, tmp_path: Path
) -> None:
    """--workers 2: the run's process killed after the close is finalized (its chunks were
    written by the workers); a worker killed after its first chunk (the run fails, exit 1,
    kills its other worker and gives its lease back); the run's process killed while its
    workers write (by a worker, after that worker's first chunk): the workers end with it."""
    scenario = SCENARIOS["month-end"]
    env = _env(scenario, tmp_path, BILLING_WORKERS="2")
    ref = reference(databases, scenario, env, tmp_path)
    assert "_write_chunk" not in ref.points, "the chunks are written by the workers"
    finalized = ref.points.index("_finalize") + 1
    seen = kill_and_rerun(
        databases,
        scenario,
        ref,
        env,
        tmp_path,
        {"BILLING_FAULT_KILL_AFTER_WRITE": str(finalized)},
        "two workers: the run killed after _finalize",
    )
    assert seen["export"] == "after"
    assert seen["credits export"] == "before"
    worker = {"BILLING_FAULT_KILL_PROCESS": "worker", "BILLING_FAULT_KILL_AFTER_WRITE": "1", **run_tag()}
    seen = kill_and_rerun(
        databases, scenario, ref, env, tmp_path, worker, "two workers: a worker killed", killed_code=1
    )
    assert set(seen.values()) <= {"before", "same"}
    parent = {"BILLING_FAULT_KILL_PROCESS": "run-by-worker", "BILLING_FAULT_KILL_AFTER_WRITE": "1"}
    where = "two workers: the run's process killed while they write"
    seen = kill_and_rerun(databases, scenario, ref, env, tmp_path, {**parent, **run_tag()}, where)
    assert set(seen.values()) <= {"before", "same"}


def test_the_fault_hook_kills_only_runs_of_the_job_named(databases: Databases, tmp_path: Path) -> None:
    scenario = SCENARIOS["month-end"]
    env = _env(scenario, tmp_path)
    url = prepare(databases, scenario, env)
    trace = tmp_path / "trace"
    other_job = {
        "BILLING_FAULT_KILL_JOB": "nightly",
        "BILLING_FAULT_KILL_AFTER_WRITE": "3",
        "BILLING_FAULT_TRACE": str(trace),
    }
    code, output = run_killed(url, scenario, {**env, **other_job}, tmp_path)
    assert code == 0, output
    labels = [line.split()[4] for line in trace.read_text(encoding="utf-8").splitlines()]
    assert labels[:3] == ["run.start", "lock.acquire", "_start"]
    assert labels[-2:] == ["run.end", "lock.release"]
    nightly = Scenario("nightly-day", ("nightly", "--date", "2026-06-10"))  # a day of an open month
    code, output = run_killed(url, nightly, {**env, **other_job}, tmp_path)
    assert code == -signal.SIGKILL, output
    assert lock_holder(url) is not None  # killed after its first data write: no cleanup ran
