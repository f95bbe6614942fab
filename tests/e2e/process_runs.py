"""Running the jobs as real processes, and comparing what they leave in the database.

Shared by the concurrency and crash-recovery tests: a run is `python -m
billing_jobs ...` in its own process (its own interpreter, connections and
signals); `billing_state` reads back everything a run decides, without run ids
and timestamps, so two databases can be compared with ==.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from support import CliResult, SourceData, charge_days, export_rows

from billing_jobs.db.billing_tables import (
    billed_days,
    billing_locks,
    billing_runs,
    charge_months,
    credit_balances,
    credit_entries,
    credit_inputs,
    credit_lot_states,
    credit_lots,
    credit_periods,
    credit_refunds,
    invoice_lines,
    invoice_series,
    invoices,
    month_closes,
    rejects,
)
from billing_jobs.db.lock import WRITER_LOCK

PYTHON = sys.executable
SECONDS = 180  # a generous ceiling for one run of the small data sets here


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child run: no settings or database leaking in from outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    env.update(extra or {})
    return env


def start_cli(
    db_url: str,
    *args: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    script: str | None = None,
    output: Path | None = None,
) -> subprocess.Popen[str]:
    """Start `python -m billing_jobs --db-url URL ARGS` (or `python -c SCRIPT ...`); its
    stdout and stderr are pipes, or both the file `output` (for processes that may outlive
    it and keep a pipe open: wait for it with `wait`, not `communicate`)."""
    prefix = ["-c", script] if script else ["-m", "billing_jobs"]
    command = [PYTHON, *prefix, "--db-url", db_url, *args]
    if output is None:
        return subprocess.Popen(
            command, cwd=cwd, env=child_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    with output.open("w", encoding="utf-8") as out:
        return subprocess.Popen(command, cwd=cwd, env=child_env(env), stdout=out, stderr=out, text=True)


def finish(proc: subprocess.Popen[str], timeout: float = SECONDS) -> CliResult:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"run did not finish in {timeout}s; stderr:\n{err}") from None
    return CliResult(proc.returncode, out, err)


# ---------------------------------------------------------------------------
# The processes of one run, found by a tag in their environment
# ---------------------------------------------------------------------------

RUN_TAG = "BILLING_TEST_RUN_TAG"


def run_tag() -> dict[str, str]:
    """An environment variable every process of a run inherits (its fork server, its
    workers): `processes_of` finds them by it, also once they are re-parented."""
    return {RUN_TAG: uuid.uuid4().hex}


def processes_of(env: dict[str, str]) -> dict[int, str]:
    """pid -> state (`R`, `S`, `T` stopped, ...) of every live process carrying the run
    tag of `env` (a zombie has died: its parent only has not read its status yet)."""
    wanted = f"{RUN_TAG}={env[RUN_TAG]}".encode()
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes()
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # ended meanwhile, or not ours to read
            continue
        state = stat.rsplit(")", 1)[1].split()[0]
        if wanted in environ.split(b"\0") and state not in ("Z", "X"):
            found[int(entry.name)] = state
    return found


def wait_for_processes(
    env: dict[str, str], done: Callable[[dict[int, str]], bool], seconds: float
) -> dict[int, str]:
    """Poll the run's processes until `done(processes)`; the last processes seen."""
    deadline = time.monotonic() + seconds
    while True:
        seen = processes_of(env)
        if done(seen) or time.monotonic() > deadline:
            return seen
        time.sleep(0.02)


def end_processes(env: dict[str, str]) -> None:
    """SIGKILL what is left of a run (a test's cleanup)."""
    if RUN_TAG not in env:
        return
    for pid in processes_of(env):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def owned(proc: subprocess.Popen[Any], env: dict[str, str]) -> Iterator[subprocess.Popen[Any]]:
    """`proc` for the block; after it, whatever is left of its run is killed and reaped."""
    try:
        yield proc
    finally:
        end_processes(env)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_process(
    db_url: str, *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = SECONDS
) -> CliResult:
    return finish(start_cli(db_url, *args, cwd=cwd, env=env), timeout)


def plain_lines(stderr: str) -> list[str]:
    """Lines of stderr that are not structured log records (JSON objects)."""
    out = []
    for line in stderr.splitlines():
        try:
            if isinstance(json.loads(line), dict):
                continue
        except ValueError:
            pass
        if line.strip():
            out.append(line)
    return out


def log_events(stderr: str) -> list[dict[str, Any]]:
    events = []
    for line in stderr.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            events.append(record)
    return events


# ---------------------------------------------------------------------------
# Databases
# ---------------------------------------------------------------------------


def another_database(request: pytest.FixtureRequest, db_url: str) -> Iterator[str]:
    """A second empty database on the same back end as `db_url` (for a reference run)."""
    for make in database_maker(request, db_url):
        yield make()


def database_maker(request: pytest.FixtureRequest, db_url: str) -> Iterator[Callable[[], str]]:
    """A function making empty databases on the back end of `db_url`; all dropped afterwards."""
    made: list[str] = []
    server = None if db_url.startswith("sqlite") else request.getfixturevalue("pg_server")
    folder = request.getfixturevalue("tmp_path")

    def make() -> str:
        if server is None:
            url = f"sqlite:///{folder / f'db-{uuid.uuid4().hex[:12]}.db'}"
            made.append(url)
            return url
        name = server.create_database()
        made.append(name)
        return str(server.url(name))

    try:
        yield make
    finally:
        if server is not None:
            for name in made:
                server.drop_database(name)


def write_source(data: SourceData, *db_urls: str) -> None:
    """Write the same rows (same ids) to every database."""
    for url in db_urls:
        copy.deepcopy(data).write_url(url)


def _rows(conn: sa.Connection, table: sa.Table, *exclude: str) -> list[tuple[Any, ...]]:
    cols = [c for c in table.columns if c.name not in exclude]
    return [tuple(r) for r in conn.execute(sa.select(*cols).order_by(*cols)).all()]


def billing_state(db_url: str, *months: str) -> dict[str, Any]:
    """Everything the jobs decided, without run ids and timestamps; comparable with ==."""
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            state: dict[str, Any] = {
                "invoices": _rows(conn, invoices, "run_id", "created_at", "finalized_at"),
                "invoice_lines": _rows(conn, invoice_lines),
                "daily_charges": charge_days(conn),  # day by day
                "rejects": _rows(conn, rejects, "first_run_id", "first_seen_at", "resolved_at", "resolution"),
                "billed_days": _rows(conn, billed_days, "run_id", "billed_at"),
                "month_closes": _rows(
                    conn, month_closes, "closed_at", "close_run_id", "last_run_id", "last_run_at"
                ),
                "invoice_series": _rows(conn, invoice_series),
            }
            if "charge_months" in sa.inspect(conn).get_table_names():
                state["charge_months"] = _rows(conn, charge_months, "run_id", "recorded_at")
            if "credit_entries" in sa.inspect(conn).get_table_names():
                state.update(
                    credit_entries=_rows(conn, credit_entries, "run_id", "recorded_at"),
                    credit_lots=_rows(conn, credit_lots, "run_id", "updated_at"),
                    credit_refunds=_rows(conn, credit_refunds, "run_id", "written_at"),
                    credit_balances=_rows(conn, credit_balances, "run_id"),
                    credit_inputs=_rows(conn, credit_inputs),
                    credit_lot_states=_rows(conn, credit_lot_states, "run_id"),
                    credit_periods=_rows(
                        conn, credit_periods, "run_id", "written_at", "last_run_id", "last_written_at"
                    ),
                )
    finally:
        engine.dispose()
    for month in months:
        state[f"export {month}"] = [
            {k: v for k, v in row.items() if k != "finalized_at"} for row in export_rows(db_url, month)
        ]
    return state


def lock_holder(db_url: str) -> Any:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.select(billing_locks).where(billing_locks.c.name == WRITER_LOCK)).first()
    finally:
        engine.dispose()


def run_records(db_url: str) -> list[dict[str, Any]]:
    """Every run record, oldest first, as dicts."""
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(billing_runs).order_by(billing_runs.c.started_at)).all()
    finally:
        engine.dispose()
    return [dict(row._mapping) for row in rows]


# ---------------------------------------------------------------------------
# Source data
# ---------------------------------------------------------------------------


def busy_month(accounts: int) -> SourceData:
    """May 2026 for `accounts` accounts: every rule at work, and a few bad rows.

    Per account: a legacy project (archived mid-month on odd accounts), a project
    created in May (free first month), a published project with cloud usage, and
    compute usage above the waiver threshold on even accounts.
    """
    data = SourceData()
    for i in range(accounts):
        acct = f"acct-{i:03d}"
        legacy, new, site = f"p-{i:03d}-legacy", f"p-{i:03d}-new", f"p-{i:03d}-site"
        data.project(legacy, created="2025-11-02", account=acct)
        data.project(new, created=f"2026-05-{1 + i % 20:02d} 10:00", account=acct)
        data.project(site, created="2026-04-01", account=acct)
        if i % 2:
            data.event(legacy, f"2026-05-{10 + i % 15:02d} 09:00", "archived")
        data.event(site, "2026-05-02 08:00", "published")
        data.compute(legacy, "2026-05-03 10:00", "0.1", count=300 if i % 2 == 0 else 7)
        data.compute(new, "2026-05-04 11:00", "2.5")
        for day in range(1, 29, 3):
            data.cloud(site, f"2026-05-{day:02d}", "page_views", str(1000 * (i + 1) + day))
            data.cloud(site, f"2026-05-{day:02d}", "bandwidth_gb", "0.3333")
        data.cloud(site, "2026-05-01", "domains", "1")  # before publication: rejected
    data.compute("p-000-new", "2026-05-06 12:00", None)  # missing amount: rejected
    # Credits: a top-up on odd accounts (even ones run into arrears), a refund request.
    for i in range(1, accounts, 2):
        data.top_up(
            f"tu-{i:03d}", "2026-05-02 09:00", account=f"acct-{i:03d}", credits="1000", amount="95.00"
        )
    if accounts > 1:
        data.refund_request("rr-001", "2026-05-25 09:00", account="acct-001")
    data.event("p-unknown", "2026-05-07 12:00", "archived")  # unknown project: rejected
    return data


def late_changes() -> SourceData:
    """Source rows that arrive after May was closed: a re-close must adjust for them."""
    data = SourceData()
    data.event("p-000-legacy", "2026-05-20 00:00", "archived")  # back-dated archive
    data.cloud("p-001-site", "2026-05-30", "page_views", "50000")  # late usage
    data.compute("p-001-legacy", "2026-05-30 10:00", "40")  # now above the waiver threshold
    data.cloud("p-002-site", "2026-05-31", "bandwidth_gb", "-1")  # negative quantity: rejected
    data.top_up("tu-late", "2026-05-28 09:00", account="acct-000", credits="100", amount="10.00", known=False)
    return data
