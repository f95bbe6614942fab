"""A killed run takes its worker processes with it, and a worker that outlives its run
writes nothing: real `billing-jobs month-end --workers 2` processes on both back ends.

Every process of a run (the command's, its fork server, its workers) inherits a tag in
its environment, so the test finds them all, also once the kernel has re-parented them.

1. The run's process is killed (SIGKILL, nothing of it runs after) while its workers
   write: within 5 s no process of the run is left (the kernel's parent-death signal,
   `billing_jobs.lifeline`), and the next run leaves what a clean run leaves.
2. Fencing, with the parent-death signal switched off (`BILLING_FAULT_ORPHANS=keep`,
   as on a kernel without it): a worker stops itself (SIGSTOP) in the middle of a
   chunk, before its write; the run's process is killed; a new run takes the lock over
   and completes; the stopped worker, resumed (SIGCONT), commits nothing (each write
   proves the lock is its run's) and ends; the state is still a clean run's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from process_runs import (
    another_database,
    billing_state,
    busy_month,
    lock_holder,
    owned,
    plain_lines,
    processes_of,
    run_process,
    run_records,
    run_tag,
    start_cli,
    wait_for_processes,
    write_source,
)
from support import run_sql

pytestmark = pytest.mark.slow

MONTH = "2026-05"
SOURCE = busy_month(24)
# 24 chunks of one account for the close, and 24 for the ledger: the workers write for a while.
ENV = {"BILLING_WORKERS": "2", "BILLING_PROJECTS_PER_CHUNK": "3", "BILLING_LEDGER_ACCOUNTS_PER_CHUNK": "1"}
GONE_SECONDS = 5.0


def _prepared(url: str, folder: Path) -> str:
    write_source(SOURCE, url)
    assert run_process(url, "db", "upgrade", cwd=folder).code == 0
    return url


@pytest.fixture
def clean(request: pytest.FixtureRequest, db_url: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """What an uninterrupted run leaves, on another database of the same back end."""
    for url in another_database(request, db_url):
        _prepared(url, tmp_path)
        done = run_process(url, "month-end", "--month", MONTH, cwd=tmp_path, env=ENV)
        assert done.code == 0, done.stderr
        yield billing_state(url, MONTH)


def _month_end(url: str, folder: Path, env: dict[str, str], log: Path) -> Any:
    """`month-end` of MONTH in a process of its own, its output in `log`."""
    return start_cli(url, "month-end", "--month", MONTH, cwd=folder, env=env, output=log)


def _trace(path: Path) -> list[list[str]]:
    """Committed write points: `<pid> <process> <job> <k> <label>` each."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    return [line.split() for line in text.splitlines() if line.strip()]


def _wait_for(condition: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not seen within {seconds}s: {what}"
        time.sleep(0.02)


def test_a_run_killed_while_its_workers_write_takes_them_with_it(
    db_url: str, clean: dict[str, Any], tmp_path: Path
) -> None:
    url = _prepared(db_url, tmp_path)
    trace = tmp_path / "trace"
    env = {**ENV, **run_tag(), "BILLING_FAULT_TRACE": str(trace)}  # counting only: nothing dies
    log = tmp_path / "killed.log"
    with owned(_month_end(url, tmp_path, env, log), env) as proc:
        _wait_for(lambda: any(t[1] == "worker" for t in _trace(trace)), 120, "a worker's write")
        running = processes_of(env)
        assert len(running) >= 3, running  # the run, its fork server, its workers
        proc.kill()  # the run's process alone, as the OOM killer or `kill -9` would
        killed = time.monotonic()
        proc.wait()
        left = wait_for_processes(env, lambda seen: not seen, GONE_SECONDS)
        assert left == {}, f"alive {GONE_SECONDS}s after the kill: {left}"
        print(f"{len(running)} processes of the run gone {time.monotonic() - killed:.2f}s after the kill")
    assert proc.returncode == -signal.SIGKILL
    assert lock_holder(url) is not None, "killed before its end: it still names the lock"
    assert billing_state(url, MONTH) != clean, "killed before it was done"

    rerun = run_process(url, "month-end", "--month", MONTH, cwd=tmp_path, env=ENV)
    assert rerun.code == 0, rerun.stderr
    assert billing_state(url, MONTH) == clean
    assert [r["status"] for r in run_records(url)] == ["abandoned", "succeeded"]


def test_a_stopped_worker_of_a_killed_run_resumed_after_a_takeover_writes_nothing(
    db_url: str, clean: dict[str, Any], tmp_path: Path
) -> None:
    url = _prepared(db_url, tmp_path)
    trace = tmp_path / "trace"
    env = {
        **ENV,
        **run_tag(),
        "BILLING_FAULT_TRACE": str(trace),
        "BILLING_FAULT_ORPHANS": "keep",  # no parent-death signal: only the fencing stops them
        "BILLING_FAULT_KILL_PROCESS": "worker",
        "BILLING_FAULT_STOP_BEFORE_WRITE": "2",  # each worker, after its chunk's reads and rules
    }
    log = tmp_path / "killed.log"
    with owned(_month_end(url, tmp_path, env, log), env) as proc:
        seen = wait_for_processes(env, lambda seen: "T" in seen.values(), 120)
        stopped = {pid for pid, state in seen.items() if state == "T"}
        assert stopped, f"no worker stopped itself: {seen}"
        proc.kill()
        proc.wait()
        time.sleep(0.5)
        orphans = processes_of(env)
        assert stopped <= set(orphans), "the stopped workers outlive their run (fault mode)"

        takeover = run_process(url, "month-end", "--month", MONTH, cwd=tmp_path, env=ENV)
        assert takeover.code == 0, takeover.stderr
        assert billing_state(url, MONTH) == clean
        committed = _trace(trace)
        assert all(int(pid) not in stopped or int(k) == 1 for pid, _, _, k, _ in committed)

        for pid in orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        left = wait_for_processes(env, lambda seen: not seen, 30)
        assert left == {}, f"resumed orphans did not end: {left}"
    assert _trace(trace) == committed, "a resumed worker committed a write"
    assert billing_state(url, MONTH) == clean
    statuses = [r["status"] for r in run_records(url)]
    assert statuses == ["abandoned", "succeeded"], statuses


def test_a_run_that_lost_its_lock_exits_75_with_one_line_and_writes_nothing_more(
    db_url: str, tmp_path: Path
) -> None:
    """The run stops itself before its first chunk's write; meanwhile its lock is taken
    from it (SQLite: the row names another run; PostgreSQL: its lock session is cut off);
    resumed, it commits nothing more and exits 75 with one line."""
    url = _prepared(db_url, tmp_path)
    trace, log = tmp_path / "trace", tmp_path / "run.log"
    env = {
        "BILLING_WORKERS": "1",
        "BILLING_FAULT_TRACE": str(trace),
        "BILLING_FAULT_STOP_BEFORE_WRITE": "4",  # run.start, lock.acquire, _start, then a chunk
    }
    with owned(_month_end(url, tmp_path, env, log), env) as proc:
        _wait_for(lambda: _state(proc.pid) == "T", 120, "the run stopped before its chunk's write")
        if url.startswith("sqlite"):
            run_sql(url, "UPDATE billing_locks SET run_id = 'rival-run'")
        else:
            run_sql(url, "SELECT pg_terminate_backend(session_pid, 10000) FROM billing_locks")  # ended
        os.kill(proc.pid, signal.SIGCONT)
        assert proc.wait(timeout=120) == 75
    lines = plain_lines(log.read_text(encoding="utf-8"))
    assert len(lines) == 1, lines
    assert lines[0].startswith("billing-jobs: this run lost its lock: lock 'billing-writer'"), lines
    assert [t[4] for t in _trace(trace)] == ["run.start", "lock.acquire", "_start", "run.end", "lock.release"]
    assert [r["status"] for r in run_records(url)] == ["failed"]


def test_a_worker_that_finds_the_lock_lost_makes_the_run_exit_75_and_ends_the_pool(
    db_url: str, tmp_path: Path
) -> None:
    """--workers 2: the workers stop before their first write; the lock is taken from
    the run; resumed, a worker's write fails, the run kills its pool, exits 75 with one
    line, and no process of it is left."""
    url = _prepared(db_url, tmp_path)
    trace, log = tmp_path / "trace", tmp_path / "run.log"
    env = {
        **ENV,
        **run_tag(),
        "BILLING_FAULT_TRACE": str(trace),
        "BILLING_FAULT_KILL_PROCESS": "worker",
        "BILLING_FAULT_STOP_BEFORE_WRITE": "1",
    }
    with owned(_month_end(url, tmp_path, env, log), env) as proc:
        seen = wait_for_processes(env, lambda seen: "T" in seen.values(), 120)
        assert "T" in seen.values(), seen
        if url.startswith("sqlite"):
            run_sql(url, "UPDATE billing_locks SET run_id = 'rival-run'")
        else:
            run_sql(url, "SELECT pg_terminate_backend(session_pid, 10000) FROM billing_locks")  # ended
        # Resume every worker, also one that stops itself only now: the run reads results
        # in chunk order, so it may wait for that worker's chunk before the failed one.
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            for pid, state in processes_of(env).items():
                if state == "T":
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
            time.sleep(0.05)
        assert proc.wait(timeout=1) == 75
        left = wait_for_processes(env, lambda seen: not seen, GONE_SECONDS)
        assert left == {}, f"alive {GONE_SECONDS}s after the run ended: {left}"
    lines = plain_lines(log.read_text(encoding="utf-8"))
    assert len(lines) == 1, lines
    assert lines[0].startswith("billing-jobs: this run lost its lock: lock 'billing-writer'"), lines
    assert [t[4] for t in _trace(trace) if t[1] == "worker"] == [], "no worker committed"
    assert [r["status"] for r in run_records(url)] == ["failed"]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_a_run_with_workers_and_a_single_chunk_leaves_no_process_behind(db_url: str, tmp_path: Path) -> None:
    """The fork server is started before the chunks are planned (`jobs.workers.warm_up`),
    also when the plan then needs no worker (one chunk runs in the run's own process):
    it ends with the run all the same, for a month-end and for a night."""
    url = _prepared(db_url, tmp_path)
    env = {"BILLING_WORKERS": "2", "BILLING_PROJECTS_PER_CHUNK": "100000", **run_tag()}
    for args in (("month-end", "--month", MONTH), ("nightly", "--date", "2026-06-01")):
        log = tmp_path / f"{args[0]}.log"  # a file, not a pipe: its end is the process's end
        with owned(start_cli(url, *args, cwd=tmp_path, env=env, output=log), env) as proc:
            assert proc.wait(120) == 0, log.read_text(encoding="utf-8")
            left = wait_for_processes(env, lambda seen: not seen, GONE_SECONDS)
            assert left == {}, f"alive {GONE_SECONDS}s after `{args[0]}` ended: {left}"
