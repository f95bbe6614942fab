"""The lower-bounds script (`benchmarks/lower_bounds.py`) on a small closed month, on both
back ends: it prints every measurement and both bounds, finds the stored month rows it
extends, and leaves the database as it found it (its UPDATE rolled back, the floor's
table dropped). No timing is asserted: the numbers are the script's to print."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from sqlalchemy import inspect, select, text

from billing_jobs.db.billing_tables import charge_periods
from billing_jobs.db.engine import make_engine, upgrade
from billing_jobs.demo import generate_bulk

ROOT = Path(__file__).resolve().parents[2]
DAILY = list(charge_periods.c.keys()).index("daily")  # set on a month row (the cloud fees)
LINE = re.compile(r"^  (?P<label>\S.*?)\s+(?P<seconds>\d+\.\d\d) s(\s+(?P<ratio>\d+\.\d\d) x)?$")
LABELS = [
    "floor (one statement, median)",
    "start-up (imports of a month-end)",
    "lifecycles (every chunk)",
    "one day's cloud usage (every chunk)",
    "a month's compute (every chunk)",
    "a month's cloud usage (every chunk)",
    "month rows extended",
    "night",
    "re-close",
]


def _stored(url: str) -> list[tuple[object, ...]]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            query = select(charge_periods).order_by(*charge_periods.primary_key.columns)
            return [tuple(row) for row in conn.execute(query)]
    finally:
        engine.dispose()


def test_the_lower_bounds_measure_a_closed_month_and_change_nothing(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        generate_bulk(
            engine, projects=300, usage_rows_per_month=6_000, months=[(2026, 5)], published_share=0.3
        )
        upgrade(engine)
    finally:
        engine.dispose()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    closed = subprocess.run(
        [sys.executable, "-m", "billing_jobs", "--db-url", db_url, "month-end", "--month", "2026-05"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert closed.returncode == 0, closed.stderr[-2000:]
    before = _stored(db_url)
    assert any(row[DAILY] is not None for row in before), "the close stored cloud-fee month rows"

    done = subprocess.run(
        [sys.executable, "benchmarks/lower_bounds.py", "--db-url", db_url, "--floor-runs", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    measured = [m for line in lines if (m := LINE.match(line))]
    assert len(measured) == len(LABELS), lines
    for match, label in zip(measured, LABELS, strict=True):
        assert match["label"].startswith(label), (match["label"], label)
    assert all(m["ratio"] for m in measured[1:]), "every figure but the floor is a ratio to it"
    rows = re.search(r"month rows extended \(([\d,]+) rows\)", done.stdout)
    assert rows, lines
    assert int(rows[1].replace(",", "")) == sum(1 for row in before if row[DAILY] is not None)

    assert _stored(db_url) == before, "the rolled-back UPDATE left every stored period as it was"
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            assert "bench_floor" not in inspect(conn).get_table_names()
            assert conn.execute(text("SELECT count(*) FROM charge_periods")).scalar_one() == len(before)
    finally:
        engine.dispose()
