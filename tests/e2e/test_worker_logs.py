"""Worker processes log as the run does: at its level, in its format, on stderr
(stdout carries results only). A real `billing-jobs` process with two workers."""

from __future__ import annotations

import json
from pathlib import Path

from process_runs import run_process
from support import SourceData


def test_the_workers_log_at_the_runs_level_on_stderr(db_url: str, tmp_path: Path) -> None:
    data = SourceData()
    for n in range(4):
        account = f"acct-{n}"
        data.project(f"p{n}", created="2025-11-02", account=account)
        data.top_up(f"t{n}", "2026-05-02 10:00", "online", account=account, credits="1000", amount="95.00")
        data.compute(f"p{n}", "2026-05-15 12:00", "5")
    data.write_url(db_url)
    env = {"BILLING_WORKERS": "2", "BILLING_LEDGER_ACCOUNTS_PER_CHUNK": "1"}
    result = run_process(
        db_url,
        "--log-level",
        "DEBUG",
        "month-end",
        "--month",
        "2026-05",
        "--projects-per-chunk",
        "1",
        cwd=tmp_path,
        env=env,
    )
    assert result.code == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    chunks = [r for r in records if r["event"] == "ledger.chunk"]
    assert sorted(r["chunk"] for r in chunks) == [0, 1, 2, 3], "each chunk, logged by its worker"
    assert all(r["level"] == "debug" for r in chunks)
    assert "ledger.chunk" not in result.stdout
    assert "[debug" not in result.stdout
    # The charges' chunks too, each with where its time went (what the benchmark sums).
    charges = [r for r in records if r["event"] == "charges.chunk"]
    assert sorted(r["chunk"] for r in charges) == [0, 1, 2, 3]
    for record in charges:
        phases = [k for k in record if k.endswith("_seconds")]
        assert {"read_seconds", "cloud_read_seconds", "compute_read_seconds", "rules_seconds"} <= set(phases)
        assert {"periods_seconds", "diff_seconds", "write_seconds"} <= set(phases)
        # The month held no charges when the run started: nothing stored is looked up.
        assert "stored_read_seconds" not in phases
        assert sum(record[k] for k in phases) <= record["seconds"] + 0.01

    # Closed again: now the month holds charges, and every chunk reads them back.
    again = run_process(
        db_url, "--log-level", "DEBUG", "month-end", "--month", "2026-05", cwd=tmp_path, env=env
    )
    assert again.code == 0, again.stderr
    records = [json.loads(line) for line in again.stderr.splitlines() if line.startswith("{")]
    charges = [r for r in records if r["event"] == "charges.chunk"]
    assert charges
    assert all("stored_read_seconds" in r for r in charges)

    quiet = run_process(db_url, "month-end", "--month", "2026-05", cwd=tmp_path, env=env)
    assert quiet.code == 0, quiet.stderr
    assert "ledger.chunk" not in quiet.stderr + quiet.stdout, "not at the default level INFO"
    assert "charges.chunk" not in quiet.stderr + quiet.stdout
