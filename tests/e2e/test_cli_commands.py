"""The command line: help, usage errors, default periods, billing days in a timezone, logs.

Commands run in-process through `run_cli` (production exit statuses), on a
SQLite file, under a frozen clock: the CLI's only clock is
`billing_jobs.commands.common.utcnow`, which `time_machine` moves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import click
import pytest
import time_machine
from support import CliResult, SourceData, export_rows, export_text, run_cli

from billing_jobs.cli import cli

LEGACY = "2025-11-02"
JUNE_1 = datetime(2026, 6, 1, 3, 0, tzinfo=UTC)


def at(instant: datetime) -> time_machine.travel:
    return time_machine.travel(instant, tick=False)


@pytest.fixture
def db_file(db_url: str) -> str:
    """The database of a command test: each test runs on SQLite and on PostgreSQL."""
    return db_url


@pytest.fixture
def june_1() -> Iterator[None]:
    with at(JUNE_1):
        yield


def ok(db_url: str, *args: str) -> CliResult:
    result = run_cli(db_url, *args)
    assert result.code == 0, result.stderr
    return result


def config(tmp_path: Path, body: str) -> str:
    path = tmp_path / "billing.toml"
    path.write_text(body)
    return str(path)


# ---------------------------------------------------------------------------
# Help
# ---------------------------------------------------------------------------


def all_commands(
    group: click.Group, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, group
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from all_commands(command, (*path, name))
        else:
            yield (*path, name), command


COMMANDS = list(all_commands(cli))


def test_the_core_commands_of_the_contract_exist():
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"db upgrade", "nightly", "month-end", "export"} <= names


@pytest.mark.parametrize(
    ("path", "command"), COMMANDS, ids=[" ".join(p) or "billing-jobs" for p, _ in COMMANDS]
)
def test_every_command_and_subcommand_has_help_text(path: tuple[str, ...], command: click.Command):
    assert (command.help or "").strip(), f"{' '.join(path)} has no help text"
    result = run_cli(None, *path, "--help")
    assert result.code == 0, result.stderr
    assert result.stdout.startswith("Usage: billing-jobs")
    first_sentence = command.help.strip().split("\n\n")[0].split(".")[0]
    assert " ".join(first_sentence.split()) in " ".join(result.stdout.split())
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            assert (param.help or "").strip(), f"{' '.join(path)} {param.opts[0]} has no help text"


# ---------------------------------------------------------------------------
# Usage errors: exit 2, one line on stderr
# ---------------------------------------------------------------------------


@pytest.mark.usefixtures("june_1")
@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        pytest.param(["month-end", "--month", "2026-13"], "2026-13", id="bad-month"),
        pytest.param(["month-end", "--month", "May"], "May", id="month-not-a-month"),
        pytest.param(["export", "--month", "2026/05"], "2026/05", id="bad-export-month"),
        pytest.param(["nightly", "--date", "2026-02-30"], "2026-02-30", id="bad-date"),
        pytest.param(["nightly", "--date", "yesterday"], "yesterday", id="date-not-a-date"),
        pytest.param(["month-end", "--month", "2026-06"], "2026-06", id="month-not-ended"),
        pytest.param(["month-end", "--month", "2027-01"], "2027-01", id="future-month"),
        pytest.param(["nightly", "--date", "2026-06-01"], "2026-06-01", id="today-has-not-ended"),
        pytest.param(["nightly", "--date", "2027-01-01"], "2027-01-01", id="date-in-the-future"),
        pytest.param(["frobnicate"], "frobnicate", id="unknown-command"),
        pytest.param(["nightly", "--frob"], "--frob", id="unknown-option"),
        pytest.param(["export"], "--month", id="missing-option"),
    ],
)
def test_bad_arguments_exit_2_with_one_line_on_stderr(db_file: str, args: list[str], mentions: str):
    result = run_cli(db_file, *args)
    assert result.code == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert mentions in lines[0]
    assert result.stdout == ""


@pytest.mark.usefixtures("june_1")
@pytest.mark.parametrize(
    "url",
    ["nonsense://nowhere", "not a url", "postgresql+nodriver://u@localhost/db"],
    ids=["scheme", "text", "driver"],
)
def test_a_bad_database_url_exits_2_with_one_line(url: str):
    for args in (
        ["nightly", "--date", "2026-05-01"],
        ["month-end", "--month", "2026-05"],
        ["export", "--month", "2026-05"],
    ):
        result = run_cli(url, *args)
        assert result.code == 2, result
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert "database URL" in result.stderr


@pytest.mark.usefixtures("june_1")
def test_a_missing_config_file_exits_2_with_one_line(db_file: str, tmp_path: Path):
    missing = tmp_path / "nowhere" / "billing.toml"
    result = run_cli(db_file, "--config", str(missing), "month-end", "--month", "2026-05")
    assert result.code == 2
    assert len(result.stderr.splitlines()) == 1
    assert str(missing) in result.stderr
    result = run_cli(db_file, "month-end", "--month", "2026-05", env={"BILLING_CONFIG": str(missing)})
    assert result.code == 2
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.usefixtures("june_1")
def test_a_month_that_has_not_ended_can_be_previewed_with_dry_run(db_file: str):
    SourceData().project("p1", created=LEGACY).write_url(db_file)
    result = ok(db_file, "month-end", "--month", "2026-06", "--dry-run")
    assert "2026-06" in result.stdout


def test_db_upgrade_is_safe_to_repeat(db_file: str):
    first = ok(db_file, "db", "upgrade")
    second = ok(db_file, "db", "upgrade")
    assert "up to date" in first.stdout
    assert second.stdout == first.stdout


# ---------------------------------------------------------------------------
# Default periods under a frozen clock
# ---------------------------------------------------------------------------


def test_month_end_defaults_to_the_previous_month_across_a_year_boundary(db_file: str):
    SourceData().project("p1", created=LEGACY).write_url(db_file)
    with at(datetime(2027, 1, 1, 3, 0, tzinfo=UTC)):
        result = ok(db_file, "month-end")
    assert "2026-12" in result.stdout
    assert [(r["period"], r["line_type"], r["amount"]) for r in export_rows(db_file, "2026-12")] == [
        ("2026-12", "storage_fee", "29")
    ]


def test_the_default_month_and_yesterday_are_local_to_the_billing_timezone(db_file: str, tmp_path: Path):
    SourceData().project("p1", created=LEGACY).write_url(db_file)
    new_york = config(tmp_path, '[billing]\ntimezone = "America/New_York"\n')
    # 2026-06-01 02:00 UTC is 2026-05-31 22:00 in New York: May has not ended there.
    with at(datetime(2026, 6, 1, 2, 0, tzinfo=UTC)):
        month_end = ok(db_file, "--config", new_york, "month-end")
        assert "month-end 2026-04" in month_end.stdout
        future = run_cli(db_file, "--config", new_york, "nightly", "--date", "2026-05-31")
        assert future.code == 2
        assert "2026-05-30" in future.stderr
        nightly = ok(db_file, "--config", new_york, "nightly")
    assert "nightly 2026-03-24..2026-05-30" in nightly.stdout
    assert export_rows(db_file, "2026-04")[0]["period"] == "2026-04"
    assert export_rows(db_file, "2026-05") == []


def test_a_daylight_saving_day_counts_as_one_billing_day(db_file: str, tmp_path: Path):
    data = SourceData()
    # 2026-11-01 is 25 hours long in New York; 00:30 local is 04:30 UTC, 11-02 00:00 local is 05:00 UTC.
    data.project("fall", created="2026-11-01 04:30").event("fall", "2026-11-02 05:00", "archived")
    # 2026-03-08 is 23 hours long; 00:00 local is 05:00 UTC, 03-09 00:00 local is 04:00 UTC.
    data.project("spring", created="2026-03-08 05:00").event("spring", "2026-03-09 04:00", "archived")
    data.write_url(db_file)
    settings = config(
        tmp_path,
        '[billing]\ntimezone = "America/New_York"\n'
        '[storage_fee]\neffective_from = "2026-03-01"\n'
        "[promotions]\nnew_project_free_months = 0\n",
    )
    with at(datetime(2026, 12, 2, 12, 0, tzinfo=UTC)):
        for month in ("2026-03", "2026-11"):
            ok(db_file, "--config", settings, "month-end", "--month", month)
    for month, project in (("2026-03", "spring"), ("2026-11", "fall")):
        rows = export_rows(db_file, month)
        assert [(r["project_id"], r["line_type"], r["quantity"], r["amount"]) for r in rows] == [
            (project, "storage_fee", "1", "1")
        ]


# ---------------------------------------------------------------------------
# Logs on stderr, results on stdout
# ---------------------------------------------------------------------------


def json_lines(stderr: str) -> list[dict[str, object]]:
    lines = stderr.splitlines()
    assert lines
    return [json.loads(line) for line in lines]  # every line is JSON


@pytest.mark.usefixtures("june_1")
@pytest.mark.parametrize(
    ("args", "period"),
    [
        (["month-end", "--month", "2026-05"], "2026-05"),
        (["nightly", "--date", "2026-05-04"], "2026-05-04..2026-05-04"),
        (["month-end", "--month", "2026-05", "--dry-run"], "2026-05"),
        (["nightly", "--dry-run"], "2026-03-24..2026-05-31"),
    ],
    ids=["month-end", "nightly", "month-end-dry-run", "nightly-dry-run"],
)
def test_a_run_logs_json_lines_with_exactly_one_summary(db_file: str, args: list[str], period: str):
    data = SourceData().project("p1", created=LEGACY).compute("ghost", "2026-05-04 10:00", "1")
    data.write_url(db_file)
    result = ok(db_file, *args)
    events = json_lines(result.stderr)
    summaries = [e for e in events if e["event"] == "run.summary"]
    assert len(summaries) == 1
    summary = summaries[0]
    assert summary["period"] == period
    assert len(str(summary["run_id"])) == 36
    assert isinstance(summary["seconds"], float | int)
    assert summary["rejects"] == 1
    assert isinstance(summary["storage_charges"], int)
    assert all("timestamp" in e and "level" in e for e in events)
    assert {e.get("run_id") for e in events if "run_id" in e} == {summary["run_id"]}
    # Results go to stdout only: nothing on stdout is a log line.
    assert result.stdout.strip()
    for line in result.stdout.splitlines():
        assert not line.lstrip().startswith("{"), line


@pytest.mark.usefixtures("june_1")
def test_export_writes_only_csv_to_stdout_and_logs_to_stderr(db_file: str, tmp_path: Path):
    SourceData().project("p1", created=LEGACY).write_url(db_file)
    ok(db_file, "month-end", "--month", "2026-05")
    result = ok(db_file, "export", "--month", "2026-05")
    assert result.stdout.splitlines()[0].startswith(
        "invoice_id,invoice_kind,account_id,project_id,period,line_type,quantity,unit_price,amount"
    )
    assert [e["event"] for e in json_lines(result.stderr)] == ["export.done"]
    out = tmp_path / "may.csv"
    to_file = ok(db_file, "export", "--month", "2026-05", "--output", str(out))
    assert to_file.stdout == ""
    assert out.read_text() == export_text(db_file, "2026-05")


def test_the_installed_command_logs_json_when_stderr_is_a_pipe(db_url: str):
    SourceData().project("p1", created=LEGACY).write_url(db_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    script = Path(sys.executable).with_name("billing-jobs")
    done = subprocess.run(
        [str(script), "--db-url", db_url, "month-end", "--month", "2026-04"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    events = json_lines(done.stderr)
    assert [e["event"] for e in events].count("run.summary") == 1
    assert "month-end 2026-04" in done.stdout
    assert "{" not in done.stdout
