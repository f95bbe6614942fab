"""The benchmark (`benchmarks/month_close.py`) runs end to end on a small platform, on
both back ends: every step as the real command, what the machine and the server did
around it, and the ratios to the floor. The numbers are the benchmark's to print, not
a test's to judge (no timing is asserted); what is asserted is that each step ran,
that the re-close wrote nothing, and that the output says what the docs quote."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pg_server import ENV_URL, PgServer

ROOT = Path(__file__).resolve().parents[2]
SMALL = ("--projects", "400", "--skip-naive", "--floor-runs", "1")
STEPS = [
    "month-end --month 2026-05",
    "db upgrade: ",
    "nightly --date 2026-05-01",
    "nightly ",
    "month-end --month 2026-05",
    "month-end --month 2026-05",
    "export --month 2026-05",
    "nightly --date 2026-06-01",
    "nightly --date 2026-06-02",
]
STEP = re.compile(r"^  (?P<label>\S.*?)\s+(?P<seconds>\d+\.\d) s\s+(?P<rate>[\d,]+) rows/s\s+(?P<memory>.*)$")
MACHINE = re.compile(r"^    machine: busy \d+\.\d s, I/O wait \d+\.\d s, written to disk [\d,]+ MiB")
RATIO = re.compile(r"^  (?P<label>\S.*?)\s+(?P<ratio>\d+\.\d\d) x$")


def _benchmark(*args: str, env: dict[str, str] | None = None) -> list[str]:
    done = subprocess.run(
        [sys.executable, "benchmarks/month_close.py", *SMALL, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


def _check(lines: list[str]) -> None:
    steps = [(i, m) for i, line in enumerate(lines) if (m := STEP.match(line))]
    labels = [m["label"] for _, m in steps]
    assert labels[0] == "floor (one statement)"
    assert len(labels) == 1 + len(STEPS), labels
    for label, expected in zip(labels[1:], STEPS, strict=True):
        assert (label + " ").startswith(expected), (label, expected)
    for i, match in steps:
        # Each step is followed by what the machine did meanwhile.
        assert MACHINE.match(lines[i + 1]), lines[i + 1]
        if match["label"] != "floor (one statement)":
            assert match["memory"].endswith("MiB"), match["memory"]
    # The re-close (the second month-end after the catch-up) writes nothing.
    reclose = steps[6][1]
    assert reclose["label"] == "month-end --month 2026-05"
    assert reclose["rate"] == "0", lines[steps[6][0]]
    assert any(line.startswith("    rows in the jobs' tables: ") for line in lines)
    at = next(i for i, line in enumerate(lines) if line.startswith("ratios to the floor ("))
    ratios = [m for line in lines[at + 1 :] if (m := RATIO.match(line))]
    assert [m["label"] for m in ratios] == labels[1:]
    assert all(float(m["ratio"]) > 0 for m in ratios)


def test_the_benchmark_runs_every_step_on_sqlite() -> None:
    _check(_benchmark())


@pytest.mark.postgres
def test_the_benchmark_runs_every_step_on_postgresql(pg_server: PgServer) -> None:
    """On the suite's server (the benchmark's throwaway database made and dropped on it):
    the settling before each step vacuums the jobs' tables there."""
    lines = _benchmark("--postgres", env={ENV_URL: pg_server.url()})
    _check(lines)
    assert lines[0].startswith("database: postgresql;")
