"""Which code ran: `billing-jobs --version`, and the code version of each job's last run.

`billing_runs.code_version` records the version of every run; `status`,
`status --json` and `runs --json` show it, so after a release one can tell
whether the last nightly and month-end already ran the new code.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import time_machine
from sqlalchemy import create_engine, select, update

from billing_jobs import __version__
from billing_jobs.db.billing_tables import billing_runs
from tests.support import SourceData, run_cli


def test_version_option_prints_the_package_version() -> None:
    result = run_cli(None, "--version")
    assert result.code == 0
    assert result.stdout.strip() == f"billing-jobs, version {__version__}"


def test_status_and_runs_show_the_code_version_of_each_jobs_last_run(db_url: str) -> None:
    SourceData().project("p1", created="2026-03-01").write_url(db_url)
    with time_machine.travel(datetime(2026, 4, 2, 12, tzinfo=UTC), tick=False):
        assert run_cli(db_url, "nightly").code == 0
        assert run_cli(db_url, "month-end", "--month", "2026-03").code == 0
        version = run_cli(None, "--version").stdout.split()[-1]

        engine = create_engine(db_url)
        try:
            with engine.connect() as conn:
                recorded = set(conn.execute(select(billing_runs.c.code_version)).scalars())
            assert recorded == {version}
            doc = json.loads(run_cli(db_url, "status", "--json").stdout)
            assert {job: run["code_version"] for job, run in doc["last_runs"].items()} == {
                "nightly": version,
                "month-end": version,
            }
            # What is shown is what the run recorded: a month-end run by an older release.
            with engine.begin() as conn:
                conn.execute(
                    update(billing_runs).where(billing_runs.c.job == "month-end").values(code_version="0.0.9")
                )
        finally:
            engine.dispose()
        doc = json.loads(run_cli(db_url, "status", "--json").stdout)
        assert doc["last_runs"]["month-end"]["code_version"] == "0.0.9"
        assert doc["last_runs"]["nightly"]["code_version"] == version
        runs = [json.loads(line) for line in run_cli(db_url, "runs", "--json").stdout.splitlines()]
        # Both runs started at the same frozen instant: their order between them is not defined.
        assert {r["job"]: r["code_version"] for r in runs} == {"month-end": "0.0.9", "nightly": version}

        text = run_cli(db_url, "status").stdout
        for job, shown in (("nightly", version), ("month-end", "0.0.9")):
            [line] = [x for x in text.splitlines() if x.startswith(f"  {job} ")]
            assert re.search(rf"  version {re.escape(shown)}$", line), line
