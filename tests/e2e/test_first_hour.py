"""The operator's first hour: a command line that starts without the heavy libraries,
a demo that leaves the database as the scheduler would, and failures to reach the
database (or read the settings) in one line, on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
import time_machine
from sqlalchemy.engine import make_url
from support import run_cli

from billing_jobs.db.billing_tables import billing_runs, credit_entries, invoice_lines, month_closes
from billing_jobs.db.engine import SCHEMA_HEAD, alembic_config, make_engine
from billing_jobs.jobs.rejects import STATUS_FILTERS

HEAVY = ("pandas", "numpy", "pyarrow", "matplotlib", "jinja2", "alembic")
# Not needed to print the help either: the database, settings and log libraries.
NOT_FOR_HELP = (*HEAVY, "sqlalchemy", "pydantic", "structlog", "rich", "apscheduler")


def _imported_by(code: str) -> list[str]:
    """The modules of NOT_FOR_HELP that a fresh interpreter has imported after `code`."""
    probe = f"import sys\n{code}\nprint(','.join(m for m in {NOT_FOR_HELP!r} if m in sys.modules))\n"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    return [m for m in done.stdout.strip().splitlines()[-1].split(",") if m] if done.stdout.strip() else []


def test_importing_the_command_line_imports_no_heavy_library() -> None:
    assert _imported_by("import billing_jobs.cli") == []


def test_help_imports_no_database_settings_or_log_library() -> None:
    code = (
        "import contextlib, io\n"
        "from billing_jobs.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass"
    )
    assert _imported_by(code) == []


def test_a_status_probe_with_the_built_in_settings_imports_no_heavy_library(tmp_path: Path) -> None:
    """`status` needs SQLAlchemy, not the data-frame, migration or settings-schema
    libraries (the built-in defaults are not validated again)."""
    url = f"sqlite:///{tmp_path / 'billing.db'}"
    assert run_cli(url, "db", "upgrade").code == 0
    code = (
        "import contextlib, io, os\n"
        "os.environ.pop('BILLING_CONFIG', None)\n"
        "from billing_jobs.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        f"        main(['--db-url', {url!r}, 'status'])\n"
        "    except SystemExit:\n"
        "        pass"
    )
    assert [m for m in _imported_by(code) if m not in ("sqlalchemy",)] == []


def test_the_schema_head_the_command_line_checks_is_the_migrations_head() -> None:
    from alembic.script import ScriptDirectory

    engine = make_engine("sqlite://")
    try:
        assert ScriptDirectory.from_config(alembic_config(engine)).get_current_head() == SCHEMA_HEAD
    finally:
        engine.dispose()


def test_the_rejects_status_choices_are_the_jobs_filters() -> None:
    result = run_cli(None, "rejects", "--help")
    assert result.code == 0, result.stderr
    assert "[open|resolved|closed|all]" in " ".join(result.stdout.split()), result.stdout
    assert list(STATUS_FILTERS) == ["open", "resolved", "closed", "all"]


# --- The demo: a running platform --------------------------------------------------------


def _count(db_url: str, table: sa.Table) -> int:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())
    finally:
        engine.dispose()


def _closed(db_url: str) -> list[str]:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return sorted(conn.execute(sa.select(month_closes.c.period)).scalars())
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("now", "yesterday", "last_closed"),
    [("2026-12-01 00:30", "2026-11-30", "2026-10"), ("2026-11-30 23:30", "2026-11-29", "2026-10")],
)
def test_the_demo_leaves_a_platform_status_calls_healthy(
    db_url: str, now: str, yesterday: str, last_closed: str
) -> None:
    """After `demo` (default --as-of: yesterday), `status` exits 0: every month before
    the last closed, the ledger written, every day billed to yesterday; a month-end of
    the last closed month changes nothing."""
    with time_machine.travel(f"{now}Z", tick=False):
        demo = run_cli(db_url, "demo", "--accounts", "6")
        assert demo.code == 0, demo.stderr
        status = run_cli(db_url, "status")
        assert status.code == 0, status.stdout + status.stderr
        assert "status: ok" in status.stdout
        assert f"last billed day:   {yesterday}" in status.stdout
        assert _closed(db_url)[0] == "2026-03"
        assert _closed(db_url)[-1] == last_closed
        assert _count(db_url, credit_entries) > 0

        def snapshot() -> tuple[str, str, int, int]:
            lines = run_cli(db_url, "export", "--month", last_closed)
            ledger = run_cli(db_url, "credits", "export", "--month", last_closed)
            assert lines.code == 0, lines.stderr
            assert ledger.code == 0, ledger.stderr
            return lines.stdout, ledger.stdout, _count(db_url, invoice_lines), _count(db_url, credit_entries)

        before = snapshot()
        assert len(list(csv.DictReader(io.StringIO(before[0])))) > 0
        again = run_cli(db_url, "month-end", "--month", last_closed)
        assert again.code == 0, again.stderr
        assert snapshot() == before, "a month-end of the demo's last closed month changed something"
        assert run_cli(db_url, "status").code == 0


def test_the_bare_demo_writes_only_the_source_data(db_url: str) -> None:
    with time_machine.travel("2026-11-15 12:00Z", tick=False):
        demo = run_cli(db_url, "demo", "--accounts", "4", "--bare", "--as-of", "2026-10-31")
        assert demo.code == 0, demo.stderr
        assert "month-end --month 2026-09" in demo.stdout
        assert _closed(db_url) == []
        assert _count(db_url, billing_runs) == 0
        assert run_cli(db_url, "status").code == 1  # months not closed, days not billed


def test_a_demo_as_of_a_day_not_ended_is_refused_unless_bare(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'billing.db'}"
    with time_machine.travel("2026-11-15 12:00Z", tick=False):
        refused = run_cli(url, "demo", "--accounts", "4", "--as-of", "2026-11-15")
        assert refused.code == 2, refused.stderr
        assert "after yesterday (2026-11-14)" in refused.stderr
        assert run_cli(url, "demo", "--accounts", "4", "--as-of", "2026-11-15", "--bare").code == 0


def test_a_demo_as_of_an_earlier_day_closes_and_bills_up_to_it(db_url: str) -> None:
    with time_machine.travel("2026-11-15 12:00Z", tick=False):
        demo = run_cli(db_url, "demo", "--accounts", "4", "--as-of", "2026-10-03")
        assert demo.code == 0, demo.stderr
        assert "2026-10-01..2026-10-03" in demo.stdout
    assert _closed(db_url)[-1] == "2026-09"


# --- Failures in one line ---------------------------------------------------------------------


def _one_line(result_stderr: str) -> list[str]:
    return [line for line in result_stderr.splitlines() if line.strip()]


def _unreachable_url(db_url: str, tmp_path: Path) -> str:
    if db_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path / 'no-such-dir' / 'billing.db'}"
    url = make_url(db_url)
    return url.set(password="s3cret-pw", port=1).render_as_string(hide_password=False)


def test_a_database_that_cannot_be_reached_is_one_line_and_exit_1(db_url: str, tmp_path: Path) -> None:
    url = _unreachable_url(db_url, tmp_path)
    for command in (["status"], ["runs"], ["month-end", "--month", "2026-10"]):
        result = run_cli(url, *command)
        assert result.code == 1, result.stderr
        lines = _one_line(result.stderr)
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("billing-jobs: error: cannot "), lines[0]
        assert "Traceback" not in result.stderr
        assert "s3cret-pw" not in result.stdout + result.stderr
        if db_url.startswith("sqlite"):
            assert "no-such-dir" in lines[0]
            assert "directory exists" in lines[0]
        else:
            parsed = make_url(db_url)
            assert f"host {parsed.host}, port 1" in lines[0]
            assert f"database {parsed.database!r}" in lines[0]
            assert f"user {parsed.username!r}" in lines[0]
            assert "check that the server is running" in lines[0]
    debug = run_cli(url, "--log-level", "DEBUG", "status")
    assert debug.code == 1
    assert "Traceback" in debug.stderr, "--log-level DEBUG shows the traceback"
    assert "s3cret-pw" not in debug.stdout + debug.stderr


def test_a_login_the_server_refuses_is_one_line_and_exit_1(pg_db_url: str) -> None:
    url = (
        make_url(pg_db_url)
        .set(username="nobody_here", password="s3cret-pw")
        .render_as_string(hide_password=False)
    )
    result = run_cli(url, "status")
    assert result.code == 1, result.stderr
    lines = _one_line(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "user 'nobody_here'" in lines[0], lines[0]
    assert "refused the login" in lines[0], lines[0]
    assert "s3cret-pw" not in result.stdout + result.stderr


def test_a_database_without_the_tables_is_one_line_and_exit_1(db_url: str) -> None:
    for command in (["status"], ["runs"], ["rejects"], ["explain", "--project", "p", "--month", "2026-10"]):
        result = run_cli(db_url, *command)
        assert result.code == 1, result.stderr
        lines = _one_line(result.stderr)
        assert len(lines) == 1, result.stderr
        assert "billing-jobs db upgrade" in lines[0], lines[0]
        assert "Traceback" not in result.stderr


def test_a_bad_database_url_is_one_line_and_exit_2() -> None:
    result = run_cli("nosuchdialect://u:s3cret-pw@h/d", "status")
    assert result.code == 2
    assert len(_one_line(result.stderr)) == 1
    assert "s3cret-pw" not in result.stderr


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_a_settings_file_that_cannot_be_read_is_one_line_and_exit_2(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "billing.toml"
    if kind == "directory":
        path.mkdir()
    result = run_cli(f"sqlite:///{tmp_path / 'b.db'}", "--config", str(path), "status")
    assert result.code == 2, result.stderr
    lines = _one_line(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "cannot read settings file" in lines[0], result.stderr
