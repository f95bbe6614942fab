"""Benchmark: how long the command line takes to answer, as a whole process.

Makes a demo database (the README's first command, a platform as the scheduler
leaves it) unless one is given, then runs each command RUNS times and prints the
median wall time of the whole process, and the same for a bare `python -c pass`
(the interpreter's own start) as the yardstick of this machine.

    .venv/bin/python benchmarks/startup.py
    .venv/bin/python benchmarks/startup.py --db billing.db --runs 11

Targets (issue 20): `--help` and `status` at most 0.4 s, `runs` and `rejects` at
most 0.6 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = (("--help",), ("status",), ("runs",), ("rejects",), ("--help-of-month-end",))


def _argv(command: tuple[str, ...]) -> list[str]:
    if command == ("--help-of-month-end",):
        return ["month-end", "--help"]
    return list(command)


def timed(argv: list[str], runs: int) -> float:
    took = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        took.append(time.perf_counter() - started)
    return statistics.median(took)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", default=None, help="An existing SQLite database (default: a fresh demo)")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as where:
        db = Path(args.db) if args.db else Path(where) / "billing.db"
        url = f"sqlite:///{db}"
        if args.db is None:
            subprocess.run(
                [sys.executable, "-m", "billing_jobs", "--db-url", url, "demo"],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        base = timed([sys.executable, "-c", "pass"], args.runs)
        print(f"python -c pass: {base:.3f} s (median of {args.runs})")
        for command in COMMANDS:
            argv = [sys.executable, "-m", "billing_jobs", "--db-url", url, *_argv(command)]
            took = timed(argv, args.runs)
            name = " ".join(_argv(command))
            print(f"billing-jobs {name:<18} {took:.3f} s  ({took / base:.1f}x python -c pass)")


if __name__ == "__main__":
    main()
