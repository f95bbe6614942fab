"""Lower bounds: what a night and a re-close cost at the least, in this design.

`month_close.py` times each job as it runs. This script times only the work that a
night and a re-close cannot do without: reading the source rows they must read, and,
for a night, touching the stored month rows of the cloud fees it extends. It runs no
rules, diff or write of its own, and compares each figure with the floor measured in
the same run. The bounds below are what the targets of `docs/performance.md` that are
still not met are measured against:

  floor                   as in month_close.py: one statement aggregating the month's
                          compute per project (the median of `--floor-runs`)
  start-up                importing what a month-end or a night runs, in a process of
                          its own (`billing_jobs.jobs.month_end` and the command line)
  lifecycles              every chunk's projects and events: what a night reads to find
                          which storage fees change (the source tables carry no time a
                          row arrived, so every project is read)
  one day's cloud usage   every chunk's cloud rows of one day: what a night bills
  a month's compute       every chunk's compute per project and billing day: what a
                          close reads for the waiver and the credits ledger
  a month's cloud usage   every chunk's cloud rows of the month: what a close bills
  month rows extended     every stored cloud-fee month row of May given one more day
                          (one UPDATE, rolled back): what a night writes at the least,
                          since every published project's month row gains its day

The reads run one chunk after another in one process, timed with the client's work
(fetching, turning the rows into columns), which is part of any reading. The bounds
spread them over the workers, as the jobs do:

  night     start-up + (lifecycles + one day's cloud usage + month rows extended) / workers
  re-close  start-up + (a month's compute + a month's cloud usage) / workers

A month must be closed first for the stored month rows to exist (`--close-first`
closes May, untimed; a database given with `--db-url` may hold it already).

    .venv/bin/python benchmarks/lower_bounds.py --projects 100000 --close-first
    BILLING_PG_USER=billing-ci .venv/bin/python benchmarks/lower_bounds.py --postgres \\
        --projects 100000 --close-first
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from zoneinfo import ZoneInfo

from sqlalchemy import Engine, func, select, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from month_close import database, floor, prepare_sources  # noqa: E402

from billing_jobs.db.billing_tables import charge_periods  # noqa: E402
from billing_jobs.db.credit_reads import read_compute_days  # noqa: E402
from billing_jobs.db.engine import make_engine  # noqa: E402
from billing_jobs.db.reads import plan_chunks, read_cloud_tallied, read_events, read_projects  # noqa: E402
from billing_jobs.db.sql import Chunk  # noqa: E402
from billing_jobs.demo import generate_bulk  # noqa: E402

MAY_FIRST, MAY_LAST, NIGHT = date(2026, 5, 1), date(2026, 5, 31), date(2026, 5, 2)
UTC = ZoneInfo("UTC")


def startup_seconds(runs: int = 3) -> float:
    """The median wall time of a process that imports what a month-end runs."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", "import billing_jobs.jobs.month_end, billing_jobs.cli"],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            check=True,
        )
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def month_rows_extended(engine: Engine) -> tuple[float, int]:
    """Seconds to give every stored cloud-fee month row of May one more day, in one
    UPDATE that is rolled back (the store is left as it was), and how many rows."""
    cp = charge_periods.c
    in_may = (cp.daily.is_not(None), cp.first_day >= MAY_FIRST, cp.first_day <= MAY_LAST)
    with engine.connect() as conn:
        rows = conn.execute(select(func.count()).where(*in_may)).scalar_one()
        conn.rollback()
        with conn.begin() as transaction:
            start = time.perf_counter()
            conn.execute(
                charge_periods.update()
                .where(*in_may)
                .values(days=cp.days + 1, daily=cp.daily + " 30 1 1", amount_units=cp.amount_units + 1)
            )
            seconds = time.perf_counter() - start
            transaction.rollback()
    return seconds, int(rows)


@contextmanager
def prepared(args: argparse.Namespace) -> Iterator[str]:
    """The database to measure: the one given, or a platform generated as month_close.py
    generates it (with the source indexes docs/postgresql.md recommends)."""
    if args.db_url:
        yield args.db_url
        return
    with database(args.postgres, None) as url:
        engine = make_engine(url)
        generate_bulk(
            engine,
            projects=args.projects,
            usage_rows_per_month=args.projects * 20,
            months=[(2026, 5), (2026, 6)],
            published_share=0.2,
            projects_per_account=args.projects_per_account,
            top_ups_per_account_month=2.0,
        )
        prepare_sources(engine)
        engine.dispose()
        yield url


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--projects", type=int, default=100_000)
    parser.add_argument("--projects-per-account", type=int, default=8)
    parser.add_argument("--postgres", action="store_true", help="start a throwaway PostgreSQL 15 server")
    parser.add_argument("--db-url", default=None, help="measure this database instead of generating one")
    parser.add_argument("--chunk", type=int, default=10_000, help="projects per chunk (the jobs' default)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--floor-runs", type=int, default=3)
    parser.add_argument("--close-first", action="store_true", help="close May first (untimed)")
    args = parser.parse_args()

    with prepared(args) as url:
        engine = make_engine(url)
        if args.close_first:
            subprocess.run(
                [sys.executable, "-m", "billing_jobs", "--db-url", url, "month-end", "--month", "2026-05"],
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                check=True,
                capture_output=True,
            )
        floors = sorted(floor(engine).seconds for _ in range(max(args.floor_runs, 1)))
        base = floors[len(floors) // 2]
        with engine.connect() as conn:
            chunks = plan_chunks(conn, args.chunk)

            def every_chunk(read: Callable[[Chunk], object]) -> float:
                start = time.perf_counter()
                for chunk in chunks:
                    read(chunk)
                return time.perf_counter() - start

            lifecycles = every_chunk(lambda c: (read_projects(conn, c), read_events(conn, c)))
            day_cloud = every_chunk(lambda c: read_cloud_tallied(conn, NIGHT, NIGHT, c))
            compute = every_chunk(lambda c: read_compute_days(conn, MAY_FIRST, MAY_LAST, UTC, c))
            cloud = every_chunk(lambda c: read_cloud_tallied(conn, MAY_FIRST, MAY_LAST, c))
        extended, month_rows = month_rows_extended(engine)
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS bench_floor"))  # the floor's, made by `floor`
        startup = startup_seconds()
        engine.dispose()

    workers = max(args.workers, 1)
    print(f"database: {engine.dialect.name}; chunks: {len(chunks)}; workers: {workers}", flush=True)
    print(f"  {'floor (one statement, median)':<44} {base:8.2f} s", flush=True)
    measured = [
        ("start-up (imports of a month-end)", startup),
        ("lifecycles (every chunk)", lifecycles),
        ("one day's cloud usage (every chunk)", day_cloud),
        ("a month's compute (every chunk)", compute),
        ("a month's cloud usage (every chunk)", cloud),
        (f"month rows extended ({month_rows:,} rows)", extended),
    ]
    for label, seconds in measured:
        print(f"  {label:<44} {seconds:8.2f} s {seconds / base:8.2f} x", flush=True)
    night = startup + (lifecycles + day_cloud + extended) / workers
    reclose = startup + (compute + cloud) / workers
    print("lower bounds (the reads spread over the workers; no rules, diff or write):", flush=True)
    print(f"  {'night':<44} {night:8.2f} s {night / base:8.2f} x", flush=True)
    print(f"  {'re-close':<44} {reclose:8.2f} s {reclose / base:8.2f} x", flush=True)


if __name__ == "__main__":
    main()
