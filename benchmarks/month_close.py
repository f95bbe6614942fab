"""Benchmark: nightly and month close at platform scale, on SQLite or a throwaway PostgreSQL.

Generates N projects (about 20 compute rows per project-month, a share of them
published with daily cloud usage) for May 2026 with `billing_jobs.demo.generate_bulk`,
then runs each step as the real command (`python -m billing_jobs ...`, a process
of its own, so its peak RSS is its own) and times, in one run:

  floor              one SQL statement that aggregates the month's compute per
                     project, joins projects and writes one row per project; run three
                     times (`--floor-runs`), the ratios are to the median
  naive loop         the per-project loop a naive user would write (a query per
                     project and an INSERT per project-day), on 2k projects, scaled to N
  month-end (first)  first close of May from scratch: every charge written
  db upgrade         migrations 0012 to the newest of that month (charges turned back into a
                     row per project and day first, by a downgrade that is not timed)
  nightly x31        the nightly run catching up every day of May (one run), on a
                     database without charges: the state "nightly ran every day"
  month-end (after)  close of May after nightly ran every day
  re-close           May again, nothing changed: compare only, writes nothing
  export             May's invoice CSV
  nightly (1 day)    June 1 billed (no later day billed yet): the storage fee of every
                     active project stored through June 30
  nightly (June 2)   the next night, one like most others: what changed on June 2 (the
                     cloud fees' month forms of the published projects)

The source tables get the indexes `docs/postgresql.md` recommends. Before each step,
untimed, what earlier steps left is settled (`settle`: the kernel's dirty pages written
out; on PostgreSQL the jobs' tables vacuumed and analyzed). It prints wall seconds,
rows per second, the peak memory of the step (the largest sum of the proportional set
sizes of the command's process and its workers, sampled from /proc), what the machine
and the server did meanwhile (`Around`), and ratios to the floor measured in the same
run (the machines are shared and noisy: compare ratios, not seconds; one measurement
of the floor moved by 15% from run to run at 1M projects, so it is the median of
three).

    .venv/bin/python benchmarks/month_close.py --projects 100000
    BILLING_PG_USER=billing-ci .venv/bin/python benchmarks/month_close.py --postgres --projects 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, delete, inspect, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from billing_jobs.db.billing_tables import billed_days, billing_metadata  # noqa: E402
from billing_jobs.db.engine import downgrade, make_engine, upgrade  # noqa: E402
from billing_jobs.demo import generate_bulk  # noqa: E402

NAIVE_PROJECTS = 2_000
BILLED_AT = datetime(2026, 6, 1, tzinfo=UTC).replace(tzinfo=None)  # naive UTC, as the jobs store it
# The source-table indexes docs/postgresql.md recommends; the chunks' aggregates read
# only indexed columns (INCLUDE on PostgreSQL, trailing key columns on SQLite).
COVERING = {
    "postgresql": [
        "CREATE INDEX bench_cu_project ON compute_usage (project_id, occurred_at) INCLUDE (credits)",
        "CREATE INDEX bench_cl_project ON cloud_usage (project_id, usage_date) INCLUDE (metric, quantity)",
    ],
    "sqlite": [
        "CREATE INDEX bench_cu_project ON compute_usage (project_id, occurred_at, credits)",
        "CREATE INDEX bench_cl_project ON cloud_usage (project_id, usage_date, metric, quantity)",
    ],
}
SOURCE_INDEXES = [
    "CREATE INDEX bench_cu_time ON compute_usage (occurred_at)",
    "CREATE INDEX bench_cl_date ON cloud_usage (usage_date)",
    "CREATE INDEX bench_pr_account ON projects (account_id)",
    "CREATE INDEX bench_ev_project ON project_events (project_id)",
    "CREATE INDEX bench_tu_account ON top_ups (account_id, paid_at)",
    "CREATE INDEX bench_tu_code ON top_ups (code)",
    "CREATE INDEX bench_rr_account ON refund_requests (account_id, requested_at)",
]
MONTH_START, MONTH_END = "2026-05-01 00:00:00", "2026-06-01 00:00:00"


@contextmanager
def database(use_postgres: bool, path: str | None) -> Iterator[str]:
    if not use_postgres:
        with tempfile.TemporaryDirectory() as folder:
            yield f"sqlite:///{path or Path(folder) / 'bench.db'}"
        return
    from pg_server import start_or_connect

    server = start_or_connect()
    name = server.create_database()
    try:
        yield server.url(name)
    finally:
        server.drop_database(name)
        server.stop()


@dataclass
class Step:
    label: str
    seconds: float
    rows: int
    peak_rss_mib: float | None
    ledger_seconds: float | None = None  # of which the credits ledger (month-end)
    ledger_phases: dict[str, float] = field(default_factory=dict)  # summed over its chunks
    charge_phases: dict[str, float] = field(default_factory=dict)  # the charges' chunks, summed
    counts: dict[str, Any] = field(default_factory=dict)  # the run summary's
    around: Around | None = None  # what the machine and the database server did meanwhile


def prepare_sources(engine: Engine) -> None:
    """The jobs' tables created, and the generated source tables made as production
    keeps them: the indexes docs/postgresql.md recommends, and what autovacuum does to
    append-only tables (statistics, all-visible pages)."""
    upgrade(engine)
    with engine.begin() as conn:
        for ddl in SOURCE_INDEXES + COVERING[engine.dialect.name]:
            conn.execute(text(ddl))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE" if engine.dialect.name == "postgresql" else "ANALYZE"))


def settle(engine: Engine) -> float:
    """Before a step, untimed: what earlier steps left the machine and the server to do,
    done. The kernel writes out their dirty pages (the data generated, a step's writes:
    the throwaway server runs without fsync, so its writes wait in memory), and on
    PostgreSQL the jobs' tables are vacuumed and analyzed, as autovacuum leaves them
    between two runs in production (a close's 4.5M rows at 1M otherwise have
    autovacuum working through them during the next step, on the same two cores).
    Returns the seconds it took."""
    start = time.perf_counter()
    os.sync()
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            present = set(inspect(conn).get_table_names())
            names = [t.name for t in billing_metadata.sorted_tables if t.name in present]
            if names:
                conn.execute(text("VACUUM ANALYZE " + ", ".join(f'"{name}"' for name in names)))
    return time.perf_counter() - start


@dataclass(frozen=True)
class Around:
    """What the machine and the database server did during a step: the machine's busy
    and I/O-wait seconds (/proc/stat: every process, the server's included), what the
    kernel wrote to disk (/proc/vmstat), and on PostgreSQL the server's checkpoints and
    automatic vacuums and analyzes (its statistics views)."""

    busy: float = 0.0
    iowait: float = 0.0
    written_mib: float = 0.0
    checkpoints: int = 0
    checkpoint_write_s: float = 0.0
    autovacuums: int = 0

    @classmethod
    def now(cls, engine: Engine) -> Around:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        ticks = [int(f) for f in fields] + [0] * 8
        hz = os.sysconf("SC_CLK_TCK")
        idle, iowait = ticks[3], ticks[4]
        busy = (sum(ticks[:8]) - idle - iowait) / hz
        vmstat = dict(line.split() for line in Path("/proc/vmstat").read_text().splitlines())
        written = int(vmstat.get("pgpgout", 0)) / 1024  # pgpgout counts KiB
        checkpoints, write_ms, vacuums = 0, 0.0, 0
        if engine.dialect.name == "postgresql":
            with engine.connect() as conn:
                checkpoints, write_ms = conn.execute(
                    text(
                        "SELECT checkpoints_timed + checkpoints_req, checkpoint_write_time"
                        " FROM pg_stat_bgwriter"
                    )
                ).one()
                vacuums = conn.execute(
                    text(
                        "SELECT coalesce(sum(autovacuum_count + autoanalyze_count), 0)"
                        " FROM pg_stat_all_tables"
                    )
                ).scalar_one()
        return cls(busy, iowait / hz, written, int(checkpoints), float(write_ms) / 1000, int(vacuums))

    def since(self, before: Around) -> Around:
        return Around(
            self.busy - before.busy,
            self.iowait - before.iowait,
            self.written_mib - before.written_mib,
            self.checkpoints - before.checkpoints,
            self.checkpoint_write_s - before.checkpoint_write_s,
            self.autovacuums - before.autovacuums,
        )

    def text(self, synced: float | None) -> str:
        settled = "" if synced is None else f" (earlier steps settled first: {synced:.1f} s)"
        line = (
            f"machine: busy {self.busy:.1f} s, I/O wait {self.iowait:.1f} s, "
            f"written to disk {self.written_mib:,.0f} MiB{settled}"
        )
        if self.checkpoints or self.autovacuums:
            line += (
                f"; server: {self.checkpoints} checkpoints (writing {self.checkpoint_write_s:.1f} s), "
                f"{self.autovacuums} automatic vacuums or analyzes"
            )
        return line


class TreeMemory(threading.Thread):
    """The largest sum of the memory of a process and all its descendants (its workers,
    their fork server), sampled from /proc every 50 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak_kib, self.done = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.peak_kib = max(self.peak_kib, sum(_rss_kib(p) for p in _tree(self.pid)))

    def stop(self) -> None:
        self.done.set()
        self.join()


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _rss_kib(pid: int) -> int:
    """The process's proportional set size: its resident memory, with pages shared with
    other processes (the fork server's modules in every worker) counted once overall."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def command(url: str, *args: str, workers: int = 1, chunk: int = 1) -> Step:
    """Run `billing-jobs ARGS` as its own process; wall time, rows written, peak RSS."""
    level = "DEBUG" if args[0] in ("month-end", "nightly") else "INFO"  # DEBUG: the chunks' phases
    argv = [sys.executable, "-m", "billing_jobs", "--db-url", url, "--log-level", level, *args]
    if args[0] in ("nightly", "month-end"):
        argv += ["--workers", str(workers), "--projects-per-chunk", str(chunk)]
    env = dict(os.environ)  # stderr is a file: JSON logs, the run.summary line parsed below
    with tempfile.TemporaryFile("w+") as err, tempfile.TemporaryFile("w+") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=ROOT)
        memory = TreeMemory(proc.pid)
        memory.start()
        _, status, _ = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        memory.stop()
        err.seek(0)
        log = err.read()
        out.seek(0)
        lines = sum(1 for _ in out) - 1
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{log[-3000:]}")
    counts: dict[str, Any] = {}
    ledger_seconds = None
    phases: dict[str, float] = {}
    charge_phases: dict[str, float] = {}
    for line in log.splitlines():
        for event, summed in (('"ledger.chunk"', phases), ('"charges.chunk"', charge_phases)):
            if event in line:
                for key, value in json.loads(line).items():
                    if key.endswith("_seconds"):
                        name = key.removesuffix("_seconds")
                        summed[name] = summed.get(name, 0) + value
        if '"run.summary"' in line:
            counts = json.loads(line)
        if '"ledger.done"' in line:
            ledger_seconds = float(json.loads(line)["seconds"])
    rows = (
        lines
        if args[0] == "export"
        else int(counts.get("rows_inserted", 0)) + int(counts.get("invoice_lines", 0))
    )
    return Step(
        " ".join(args), seconds, rows, memory.peak_kib / 1024, ledger_seconds, phases, charge_phases, counts
    )


def rows_stored(engine: Engine, projects: int) -> None:
    """Print the rows in the jobs' tables (after one month closed: what a month wrote),
    per project."""
    with engine.connect() as conn:
        counts = {
            t.name: int(conn.execute(text(f'SELECT count(*) FROM "{t.name}"')).scalar_one())
            for t in billing_metadata.sorted_tables
        }
    total = sum(counts.values())
    largest = ", ".join(f"{name} {n:,}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1])[:6])
    print(
        f"    rows in the jobs' tables: {total:,} ({total / projects:.2f} per project): {largest}", flush=True
    )


def floor(engine: Engine) -> Step:
    """One statement: the month's compute per project, joined to projects, one row each."""
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS bench_floor"))
        conn.execute(
            text("CREATE TABLE bench_floor (project_id VARCHAR(64), account_id VARCHAR(64), credits NUMERIC)")
        )
    start = time.perf_counter()
    with engine.begin() as conn:
        rows = conn.execute(
            text(
                "INSERT INTO bench_floor SELECT p.project_id, p.account_id, SUM(c.credits)"
                " FROM compute_usage c JOIN projects p ON p.project_id = c.project_id"
                " WHERE c.occurred_at >= :start AND c.occurred_at < :end"
                " GROUP BY p.project_id, p.account_id"
            ),
            {"start": MONTH_START, "end": MONTH_END},
        ).rowcount
    return Step("floor (one statement)", time.perf_counter() - start, rows, None)


def naive(engine: Engine, total_projects: int) -> Step:
    """A query per project and an INSERT per project-day, on NAIVE_PROJECTS, scaled."""
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS bench_naive"))
        conn.execute(text("CREATE TABLE bench_naive (project_id VARCHAR(64), day INTEGER, credits NUMERIC)"))
        ids = [r[0] for r in conn.execute(text(f"SELECT project_id FROM projects LIMIT {NAIVE_PROJECTS}"))]
    start = time.perf_counter()
    with engine.begin() as conn:
        for project_id in ids:
            conn.execute(
                text(
                    "SELECT kind, occurred_at FROM project_events WHERE project_id = :p ORDER BY occurred_at"
                ),
                {"p": project_id},
            ).all()
            compute = conn.execute(
                text(
                    "SELECT SUM(credits) FROM compute_usage WHERE project_id = :p"
                    " AND occurred_at >= :start AND occurred_at < :end"
                ),
                {"p": project_id, "start": MONTH_START, "end": MONTH_END},
            ).scalar()
            conn.execute(
                text("SELECT usage_date, metric, quantity FROM cloud_usage WHERE project_id = :p"),
                {"p": project_id},
            ).all()
            charged = 0
            for day in range(1, 32):
                amount = 1 if charged < 29 else 0
                charged += amount
                if amount:
                    conn.execute(
                        text("INSERT INTO bench_naive VALUES (:p, :d, :c)"),
                        {"p": project_id, "d": day, "c": 0 if (compute or 0) >= 30 else amount},
                    )
    seconds = (time.perf_counter() - start) * total_projects / max(len(ids), 1)
    return Step(f"naive loop ({len(ids):,} projects, scaled)", seconds, 29 * total_projects, None)


def days_until_yesterday() -> list[date]:
    """From the default effective date to yesterday (UTC, the default billing timezone)."""
    first, last = date(2026, 3, 24), datetime.now(UTC).date() - timedelta(days=1)
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def to_legacy_store(engine: Engine) -> int:
    """The store turned back into a row per project and day (`downgrade` to 0011, not
    timed): what `migration` upgrades. Returns the daily charges it holds."""
    downgrade(engine, "0011")
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM daily_charges")).scalar_one())


def migration(url: str, days: int) -> Step:
    """Migrations 0012 (runs), 0013 (cloud fees per month) and the newer ones on the
    month just closed (`to_legacy_store`): `db upgrade` timed as the command it is."""
    step = command(url, "db", "upgrade")
    return Step(f"db upgrade: {days:,} daily charges to periods", step.seconds, days, step.peak_rss_mib)


def reset_jobs_tables(engine: Engine) -> None:
    """The jobs' tables as no job had run (the runs' history and locks kept). PostgreSQL:
    TRUNCATE, as a database where no job ran holds no dead row; a DELETE of the first
    close's 4.5M rows at 1M left them in the tables and their indexes, for the next
    runs' lookups to step over until a vacuum."""
    kept = ("billing_runs", "billing_locks")
    tables = [t for t in reversed(billing_metadata.sorted_tables) if t.name not in kept]
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("TRUNCATE " + ", ".join(f'"{t.name}"' for t in tables)))
            return
        for table in tables:
            conn.execute(table.delete())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--projects", type=int, default=100_000)
    parser.add_argument("--rows-per-project", type=int, default=20, help="compute rows per project-month")
    parser.add_argument("--published", type=float, default=0.2, help="share of projects published")
    parser.add_argument("--postgres", action="store_true", help="start a throwaway PostgreSQL 15 server")
    parser.add_argument("--sqlite-path", default=None)
    parser.add_argument("--chunk", type=int, default=10_000, help="projects per chunk (the default)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--projects-per-account", type=int, default=8)
    parser.add_argument(
        "--first-close-only",
        action="store_true",
        help="only the floor and the first month-end (with its ledger)",
    )
    parser.add_argument(
        "--top-ups", type=float, default=2.0, help="online top-ups per account and month (the ledger's input)"
    )
    parser.add_argument(
        "--floor-runs",
        type=int,
        default=3,
        help="times the floor is measured; the ratios are to their median (one run moves by 15%% here)",
    )
    parser.add_argument(
        "--no-settle",
        dest="settle",
        action="store_false",
        help="start each step without first settling what earlier steps left (`settle`)",
    )
    args = parser.parse_args()
    steps: list[Step] = []

    with database(args.postgres, args.sqlite_path) as url:
        engine = make_engine(url)
        print(
            f"database: {engine.dialect.name}; projects={args.projects:,}; "
            f"compute rows={args.projects * args.rows_per_project:,}; published={args.published:.0%}; "
            f"workers={args.workers}; chunk={args.chunk:,}; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
            flush=True,
        )
        start = time.perf_counter()
        summary = generate_bulk(
            engine,
            projects=args.projects,
            usage_rows_per_month=args.projects * args.rows_per_project,
            months=[(2026, 5), (2026, 6)],
            published_share=args.published,
            projects_per_account=args.projects_per_account,
            top_ups_per_account_month=args.top_ups,
        )
        print(f"  generated in {time.perf_counter() - start:.0f} s: {summary}", flush=True)
        prepare_sources(engine)

        def run(make: Callable[[], Step]) -> Step:
            synced = settle(engine) if args.settle else None
            before = Around.now(engine)
            step = make()
            step.around = Around.now(engine).since(before)
            steps.append(step)
            rss = f"{step.peak_rss_mib:7.0f} MiB" if step.peak_rss_mib is not None else "          -"
            rate = step.rows / step.seconds if step.seconds else 0.0
            print(f"  {step.label:<44} {step.seconds:8.1f} s {rate:12,.0f} rows/s {rss}", flush=True)
            print(f"    {step.around.text(synced)}", flush=True)
            if step.charge_phases:
                phases = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(step.charge_phases.items()))
                print(f"    the charges' chunks' phases (summed over the workers): {phases}", flush=True)
            if step.ledger_seconds is not None:
                print(f"    of which the credits ledger {step.ledger_seconds:17.1f} s", flush=True)
                phases = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(step.ledger_phases.items()))
                print(f"      its chunks' phases (summed over the workers): {phases}", flush=True)
            return step

        kw = {"workers": args.workers, "chunk": args.chunk}
        floors = [run(lambda: floor(engine)) for _ in range(max(args.floor_runs, 1))]
        base = sorted(floors, key=lambda step: step.seconds)[len(floors) // 2]
        if not args.skip_naive:
            run(lambda: naive(engine, args.projects))
        run(lambda: command(url, "month-end", "--month", "2026-05", **kw))
        rows_stored(engine, args.projects)
        days = to_legacy_store(engine)
        run(lambda: migration(url, days))
        if args.first_close_only:
            run(lambda: command(url, "month-end", "--month", "2026-06", **kw))
            engine.dispose()
            steps_done(steps, base)
            return
        reset_jobs_tables(engine)
        run(lambda: command(url, "nightly", "--date", "2026-05-01", **kw))
        # The other days of May in one catch-up run (`nightly` with no date): the state after
        # a month of nightly runs. Every other day up to yesterday is marked billed first.
        others = [d for d in days_until_yesterday() if d.month != 5 or d.year != 2026]
        with engine.begin() as conn:
            conn.execute(
                billed_days.insert(),
                [{"billing_day": d, "run_id": "bench", "billed_at": BILLED_AT} for d in others],
            )
        run(lambda: command(url, "nightly", **kw))
        run(lambda: command(url, "month-end", "--month", "2026-05", **kw))
        run(lambda: command(url, "month-end", "--month", "2026-05", **kw))
        run(lambda: command(url, "export", "--month", "2026-05"))
        # June's nights as in production: no later day billed yet, so June 1 stores the
        # storage fee through the month's end and June 2 is a night like most others.
        with engine.begin() as conn:
            bd = billed_days.c
            conn.execute(
                delete(billed_days).where(
                    bd.billing_day > date(2026, 6, 1), bd.billing_day <= date(2026, 6, 30)
                )
            )
        run(lambda: command(url, "nightly", "--date", "2026-06-01", **kw))
        run(lambda: command(url, "nightly", "--date", "2026-06-02", **kw))
        engine.dispose()

    steps_done(steps, base)


def steps_done(steps: list[Step], base: Step) -> None:
    floors = [step.seconds for step in steps if step.label == base.label]
    measured = ", ".join(f"{seconds:.2f}" for seconds in floors)
    print(f"ratios to the floor ({base.seconds:.2f} s, the median of {measured} s, same run):")
    for step in steps:
        if step.label != base.label:
            print(f"  {step.label:<44} {step.seconds / base.seconds:8.2f} x")


if __name__ == "__main__":
    main()
