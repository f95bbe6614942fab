"""Benchmark: six months closed in order, the credits ledger's cost per close.

A month-end of M reads the source rows of M and of the `[ledger] late_data_months`
periods before it (default 2), and continues from the balances written at the end of
the last settled period (`credits.md`, Ledger periods). So each close's ledger should
cost about the same, however many periods are written before it.

Generates N projects with compute in April..September 2026 (about 20 rows per
project-month) and two online top-ups per account-month, with
`billing_jobs.demo.generate_bulk`; then closes the six months in order, each as the
real command (`python -m billing_jobs month-end`, a process of its own). Before each
close it times that month's floor (one SQL statement that aggregates the month's
compute per project; the median of three runs). It prints per close: wall seconds, the ledger's seconds, both
against the month's floor, the periods the ledger read, and at the end the sixth
close's ledger against the third's (the third is the first with a full window).

    .venv/bin/python benchmarks/ledger_months.py --projects 100000
    BILLING_PG_USER=billing-ci .venv/bin/python benchmarks/ledger_months.py --postgres --projects 100000
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent))

from month_close import Step, command, database, prepare_sources

from billing_jobs.db.engine import make_engine
from billing_jobs.demo import generate_bulk
from billing_jobs.rules.calendar import Month

MONTHS = [Month(2026, m) for m in range(4, 10)]


def month_floor(engine: Engine, month: Month, repeat: int = 3) -> float:
    """The median of `repeat` runs of the floor statement for `month` (the first run
    also warms the month's pages, which the close then reads)."""
    times = sorted(_floor_once(engine, month) for _ in range(repeat))
    return times[len(times) // 2]


def _floor_once(engine: Engine, month: Month) -> float:
    """One statement: the month's compute per project, joined to projects, one row each."""
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS bench_floor"))
        conn.execute(
            text("CREATE TABLE bench_floor (project_id VARCHAR(64), account_id VARCHAR(64), credits NUMERIC)")
        )
    start = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO bench_floor SELECT p.project_id, p.account_id, SUM(c.credits)"
                " FROM compute_usage c JOIN projects p ON p.project_id = c.project_id"
                " WHERE c.occurred_at >= :start AND c.occurred_at < :end"
                " GROUP BY p.project_id, p.account_id"
            ),
            {"start": f"{month.first_day} 00:00:00", "end": f"{month.next().first_day} 00:00:00"},
        )
    return time.perf_counter() - start


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
    parser.add_argument("--projects-per-account", type=int, default=8)
    parser.add_argument("--top-ups", type=float, default=2.0, help="online top-ups per account and month")
    args = parser.parse_args()

    with database(args.postgres, args.sqlite_path) as url:
        engine = make_engine(url)
        print(
            f"database: {engine.dialect.name}; projects={args.projects:,}; months={MONTHS[0]}..{MONTHS[-1]}; "
            f"compute rows per month={args.projects * args.rows_per_project:,}; top-ups per account-month="
            f"{args.top_ups}; workers={args.workers}; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
            flush=True,
        )
        start = time.perf_counter()
        summary = generate_bulk(
            engine,
            projects=args.projects,
            usage_rows_per_month=args.projects * args.rows_per_project,
            months=[(m.year, m.month) for m in MONTHS],
            published_share=args.published,
            projects_per_account=args.projects_per_account,
            top_ups_per_account_month=args.top_ups,
        )
        print(f"  generated in {time.perf_counter() - start:.0f} s: {summary}", flush=True)
        prepare_sources(engine)

        print(
            f"  {'close':<8} {'floor':>7} {'month-end':>10} {'x floor':>8} {'ledger':>8} {'x floor':>8}"
            f" {'periods read':>13} {'peak':>9}",
            flush=True,
        )
        ledgers: list[float] = []
        for month in MONTHS:
            base = month_floor(engine, month)
            step: Step = command(
                url, "month-end", "--month", str(month), workers=args.workers, chunk=args.chunk
            )
            ledger = step.ledger_seconds or 0.0
            ledgers.append(ledger / base)
            print(
                f"  {month!s:<8} {base:6.1f}s {step.seconds:9.1f}s {step.seconds / base:7.1f}x {ledger:7.1f}s"
                f" {ledger / base:7.1f}x {step.counts.get('ledger_periods_read', '?')!s:>13}"
                f" {step.peak_rss_mib or 0:6.0f} MiB",
                flush=True,
            )
            phases = ", ".join(f"{k} {v:.1f}" for k, v in sorted(step.ledger_phases.items()))
            replayed = step.counts.get("accounts_replayed_whole", "?")
            print(
                f"           ledger phases (s, summed over the workers): {phases}; replayed whole {replayed}"
            )
        engine.dispose()
    print(
        f"the sixth close's ledger against the third's (each as a ratio to its month's floor): "
        f"{ledgers[5] / ledgers[2]:.2f}x"
    )


if __name__ == "__main__":
    main()
