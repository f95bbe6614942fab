"""Invoice numbers after a month-end killed (SIGKILL, a real process) inside the
transaction that finalizes and numbers: the numbers it had taken die with it, and
the re-run gives 1..N again; the re-close's adjustments, killed the same way,
start their own series at 1. The result equals an uninterrupted run's."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from process_runs import another_database, billing_state, finish, start_cli
from support import SourceData, run_cli

pytestmark = pytest.mark.slow

MONTH = "2026-05"
ACCOUNTS = ["acct-b", "acct-a", "acct-C"]

# The production command line with the finalizing step's work done, then SIGKILL
# before its transaction commits.
DIES_IN_FINALIZE = """
import os, signal, sys
from billing_jobs.jobs import month_end

real = month_end._finalize

def finalize_then_die(conn, **kwargs):
    real(conn, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

month_end._finalize = finalize_then_die
from billing_jobs.cli import main
main(sys.argv[1:])
"""


def _source(url: str) -> None:
    data = SourceData()
    for account in ACCOUNTS:
        data.project(f"p-{account}", created="2025-11-02", account=account)
    data.write_url(url)


def _late(url: str) -> None:
    SourceData().event("p-acct-b", "2026-05-20 00:00", "archived").event(
        "p-acct-a", "2026-05-25 00:00", "archived"
    ).write_url(url)


def _ok(url: str, *args: str) -> None:
    result = run_cli(url, *args)
    assert result.code == 0, result.stderr


def _killed_then_rerun(url: str, tmp_path: Path, *args: str) -> None:
    killed = finish(start_cli(url, *args, cwd=tmp_path, script=DIES_IN_FINALIZE))
    assert killed.code == -signal.SIGKILL, killed.stderr
    _ok(url, *args)  # at once: the dead run's lock is taken over


def _numbers(state: dict[str, object]) -> list[tuple[str, str]]:
    rows = state["invoices"]
    assert isinstance(rows, list)
    return sorted((r[0], r[-1]) for r in rows)


def test_a_month_end_killed_while_numbering_then_rerun_numbers_without_gaps(
    request: pytest.FixtureRequest, db_url: str, tmp_path: Path
) -> None:
    for url in another_database(request, db_url):
        _source(url)
        _ok(url, "month-end", "--month", MONTH)
        _late(url)
        _ok(url, "month-end", "--month", MONTH)
        expected = billing_state(url, MONTH)

    _source(db_url)
    _killed_then_rerun(db_url, tmp_path, "month-end", "--month", MONTH)
    _late(db_url)
    _killed_then_rerun(db_url, tmp_path, "month-end", "--month", MONTH)
    state = billing_state(db_url, MONTH)
    assert _numbers(state) == [
        ("ADJ-2026-05-acct-a-001", "A-2026-000001"),
        ("ADJ-2026-05-acct-b-001", "A-2026-000002"),
        ("INV-2026-05-acct-C", "R-2026-000001"),
        ("INV-2026-05-acct-a", "R-2026-000002"),
        ("INV-2026-05-acct-b", "R-2026-000003"),
    ]
    assert state["invoice_series"] == [("adjustment", 2026, 2), ("regular", 2026, 3)]
    assert state == expected
