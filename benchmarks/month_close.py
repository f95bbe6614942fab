"""Benchmark: month close at platform scale, on SQLite or a throwaway PostgreSQL.

Generates N projects and M compute rows for one month (billing_jobs.demo.generate_bulk),
then times, in one process and one run:

  baseline      the database alone: GROUP BY over the month's compute rows and a
                scan of projects (what any month close must at least read)
  month-end     first close of the month from scratch (every daily charge written)
  month-end #2  the same month again (nothing to change: compare only)
  nightly       one more day billed in the next month
  export        the month's CSV

and prints seconds and ratios to the baseline measured in the same run (the
machines are shared and noisy: compare ratios, not seconds).

    .venv/bin/python benchmarks/month_close.py --projects 200000 --rows 2000000
    .venv/bin/python benchmarks/month_close.py --postgres --projects 1000000 --rows 10000000
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from billing_jobs import logs  # noqa: E402
from billing_jobs.db.engine import make_engine, upgrade  # noqa: E402
from billing_jobs.db.source_tables import compute_usage, projects  # noqa: E402
from billing_jobs.demo import generate_bulk  # noqa: E402
from billing_jobs.jobs import month_end, nightly  # noqa: E402
from billing_jobs.jobs.export import export_month  # noqa: E402
from billing_jobs.jobs.runner import run_job  # noqa: E402
from billing_jobs.rules.calendar import Month  # noqa: E402
from billing_jobs.settings import load_settings  # noqa: E402


@contextmanager
def database(use_postgres: bool, path: str | None):
    if not use_postgres:
        folder = tempfile.TemporaryDirectory()
        yield f"sqlite:///{path or Path(folder.name) / 'bench.db'}"
        folder.cleanup()
        return
    from pg_server import start_or_connect

    server = start_or_connect()
    name = server.create_database()
    try:
        yield server.url(name)
    finally:
        server.drop_database(name)
        server.stop()


def timed(label: str, results: dict[str, float], fn: Any) -> Any:
    start = time.perf_counter()
    value = fn()
    results[label] = time.perf_counter() - start
    print(f"  {label:<14} {results[label]:8.2f} s", flush=True)
    return value


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--projects", type=int, default=100_000)
    parser.add_argument("--rows", type=int, default=1_000_000, help="compute rows in the month")
    parser.add_argument("--postgres", action="store_true", help="start a throwaway PostgreSQL 15 server")
    parser.add_argument("--sqlite-path", default=None)
    parser.add_argument("--chunk", type=int, default=month_end.PROJECTS_PER_CHUNK, help="projects per chunk")
    args = parser.parse_args()
    logs.configure("WARNING", json=True)
    settings = load_settings(None)
    month = Month(2026, 5)
    results: dict[str, float] = {}

    with database(args.postgres, args.sqlite_path) as url:
        engine = make_engine(url)
        print(f"database: {engine.dialect.name}; projects={args.projects:,} compute rows={args.rows:,}")
        summary = timed(
            "generate",
            results,
            lambda: generate_bulk(
                engine, projects=args.projects, usage_rows_per_month=args.rows, months=[(2026, 5)]
            ),
        )
        print(f"  generated: {summary}")
        upgrade(engine)
        if engine.dialect.name == "postgresql":
            with engine.begin() as conn:
                conn.execute(text("ANALYZE"))

        def baseline() -> None:
            with engine.connect() as conn:
                conn.execute(
                    select(compute_usage.c.project_id, func.sum(compute_usage.c.credits)).group_by(
                        compute_usage.c.project_id
                    )
                ).all()
                conn.execute(
                    select(projects.c.project_id, projects.c.account_id, projects.c.created_at)
                ).all()

        timed("baseline", results, baseline)
        now = datetime(2026, 6, 2, 3, 0, tzinfo=UTC)

        def close() -> Any:
            return run_job(
                engine,
                settings,
                "month-end",
                period=str(month),
                arguments={},
                now=now,
                body=lambda run: month_end.close_month(run, month, args.chunk),
            )

        first = timed("month-end", results, close)
        again = timed("month-end #2", results, close)
        timed(
            "nightly",
            results,
            lambda: run_job(
                engine,
                settings,
                "nightly",
                period="2026-06-01",
                arguments={},
                now=now,
                body=lambda run: nightly.bill_days(run, [date(2026, 6, 1)], args.chunk),
            ),
        )
        out = io.StringIO()
        lines = timed("export", results, lambda: export_month(engine, str(month), out))
        engine.dispose()

    print(
        f"  month-end wrote {first.counts.get('rows_inserted', 0):,} daily charges, "
        f"{first.counts.get('invoices', 0):,} invoices, {first.counts.get('invoice_lines', 0):,} lines; "
        f"re-run wrote {again.counts.get('rows_inserted', 0) + again.counts.get('invoice_lines', 0)} rows; "
        f"export {lines:,} lines"
    )
    base = results["baseline"]
    print("ratios to the baseline (same run):")
    for label in ("month-end", "month-end #2", "nightly", "export"):
        print(f"  {label:<14} {results[label] / base:8.1f} x")


if __name__ == "__main__":
    main()
