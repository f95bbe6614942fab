"""The database password never shows: not in logs, run records, errors, metrics or `--help`.

The URL (`BILLING_DB_URL` or `--db-url`) carries a password with characters
that URL-encoding changes (`/ % @ : # +` and a space), for a PostgreSQL role
that has that password (SQLite URLs have none). The nightly and the month-end
run as real processes with it, then `status`, `runs`, `metrics` and `export`
read what they wrote; everything is searched for the password: as is,
percent-encoded (either hex case), form-encoded, JSON- or repr-escaped, and for
its first letters alone (a partly masked password is a leak too). The test
server trusts local connections, so authentication itself cannot fail: the
failures are a closed port, a database that does not exist, a role that may not
log in and malformed URLs, each of which the server or the driver reports back.
A job whose exception quotes the URL shows that the runner masks what it records.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote, quote_plus

import click
import pytest
import sqlalchemy as sa
import time_machine
from pg_server import PgServer
from process_runs import child_env, finish, log_events
from psycopg import sql
from sqlalchemy.engine import make_url
from support import CliResult, SourceData, run_cli

from billing_jobs import logs
from billing_jobs.cli import cli
from billing_jobs.db.billing_tables import billing_locks, billing_runs
from billing_jobs.db.engine import make_engine, upgrade
from billing_jobs.jobs.runner import run_job
from billing_jobs.settings import load_settings
from tests.integration.test_metrics import FakePushgateway, pushgateway, write_config

__all__ = ["pushgateway"]  # the fixture, shared with the metrics tests

PASSWORD = "S3cr3t-pw/%@:x y+#"
MARKER = "S3cr3t"  # the password's first letters: any part of it showing is a leak
CLOCK_DIR = Path(__file__).resolve().parent / "clock"
NOW = "2026-06-02T12:00:00+00:00"


def password_forms() -> set[str]:
    encoded = quote(PASSWORD, safe="")
    return {
        PASSWORD,
        encoded,
        re.sub(r"%[0-9A-F]{2}", lambda m: m[0].lower(), encoded),
        quote(PASSWORD),
        quote_plus(PASSWORD),
        json.dumps(PASSWORD)[1:-1],
        repr(PASSWORD)[1:-1],
        MARKER,
        MARKER.lower(),
    }


def assert_no_password(text: str, where: str) -> None:
    for form in password_forms():
        assert form not in text, f"the password ({form!r}) shows in {where}:\n{text}"


@pytest.fixture
def secret_url(pg_server: PgServer) -> Iterator[str]:
    """URL of a fresh database owned by a role with PASSWORD, the password in the URL."""
    role = f"billing_secret_{uuid.uuid4().hex[:8]}"
    with pg_server.admin_connection() as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(PASSWORD))
        )
        name = pg_server.create_database()
        conn.execute(
            sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(name), sql.Identifier(role))
        )
    url = make_url(pg_server.url(name)).set(username=role, password=PASSWORD)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        pg_server.drop_database(name)
        with pg_server.admin_connection() as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def run_process(*args: str, db_url: str, cwd: Path, config: str | None = None) -> CliResult:
    """`python -m billing_jobs ARGS` with the URL in BILLING_DB_URL, under the test clock."""
    env = child_env(
        {
            "BILLING_DB_URL": db_url,
            "BILLING_TEST_CLOCK": NOW,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(CLOCK_DIR), os.environ.get("PYTHONPATH")])),
            **({"BILLING_CONFIG": config} if config else {}),
        }
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "billing_jobs", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return finish(proc)


def table_text(db_url: str, table: sa.Table) -> str:
    """Every row of `table`, every column, as text."""
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return "\n".join(repr(tuple(row)) for row in conn.execute(sa.select(table)))
    finally:
        engine.dispose()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_month_of_runs_shows_the_password_nowhere(
    secret_url: str, tmp_path: Path, pushgateway: FakePushgateway
) -> None:
    data = SourceData()
    data.project("p1", created="2026-01-10")
    data.event("p1", "2026-05-01 10:00", "published")
    data.cloud("p1", "2026-05-03", "page_views", "12345")
    data.compute("ghost", "2026-05-03 10:00", "1")  # unknown project: a reject, logged
    data.write_url(secret_url)
    textfile = tmp_path / "billing_jobs.prom"
    config = write_config(tmp_path, metrics_textfile=str(textfile), pushgateway_url=pushgateway.url)

    # The jobs as real processes (the URL in the environment, as in production) ...
    results = {
        job: run_process("--log-level", "DEBUG", *args, db_url=secret_url, cwd=tmp_path, config=config)
        for job, args in (("nightly", ["nightly"]), ("month-end", ["month-end", "--month", "2026-05"]))
    }
    # ... and what one reads afterwards, in this process (with the URL as --db-url too).
    env = {"BILLING_DB_URL": secret_url, "BILLING_CONFIG": str(config)}
    with time_machine.travel(NOW, tick=False):
        results["db upgrade"] = run_cli(secret_url, "--log-level", "DEBUG", "db", "upgrade")
        for args in (
            ("status",),
            ("status", "--json"),
            ("runs",),
            ("runs", "--json"),
            ("metrics",),
            ("export", "--month", "2026-05"),
            ("schedule", "--once", "nightly"),  # nothing left to bill: one more run, recorded
        ):
            results[" ".join(args)] = run_cli(None, *args, env=env)

    for name, result in results.items():
        assert result.code == 0, f"{name}: {result.stderr}"
        assert_no_password(result.stdout, f"the stdout of {name}")
        assert_no_password(result.stderr, f"the stderr (logs) of {name}")
    # The URL is shown, masked; the runs were logged and recorded, and metrics written and pushed.
    assert ":***@127.0.0.1:" in results["db upgrade"].stdout
    events = {e["event"] for e in log_events(results["nightly"].stderr)}
    assert {"run.start", "run.summary", "metrics.textfile_written", "metrics.pushed"} <= events
    assert len(pushgateway.received) == 3
    for method, path, body in pushgateway.received:
        assert_no_password(f"{method} {path}\n{body}", "a push to the Pushgateway")
    assert "billing_job_last_status" in textfile.read_text(encoding="utf-8")
    assert_no_password(textfile.read_text(encoding="utf-8"), "the metrics textfile")
    runs = table_text(secret_url, billing_runs)
    assert runs.count("'succeeded'") == 3
    assert_no_password(runs, "billing_runs")
    assert_no_password(table_text(secret_url, billing_locks), "billing_locks")
    status = json.loads(results["status --json"].stdout)
    assert set(status["last_runs"]) == {"nightly", "month-end"}


def test_connection_failures_show_no_password(secret_url: str, pg_server: PgServer, tmp_path: Path) -> None:
    url = make_url(secret_url)
    with pg_server.admin_connection() as conn:
        no_login = f"billing_nologin_{uuid.uuid4().hex[:8]}"
        conn.execute(
            sql.SQL("CREATE ROLE {} NOLOGIN PASSWORD {}").format(
                sql.Identifier(no_login), sql.Literal(PASSWORD)
            )
        )
    try:
        refused = url.set(port=closed_port()).render_as_string(hide_password=False)
        failing = {
            "a closed port": (refused, "Connection refused"),
            "a missing database": (
                url.set(database="no_such_db").render_as_string(hide_password=False),
                'database "no_such_db" does not exist; the server has no such database',
            ),
            "a role that may not log in": (
                url.set(username=no_login).render_as_string(hide_password=False),
                "is not permitted to log in; the server refused the login",
            ),
        }
        results = {
            "a closed port (process)": (run_process("nightly", db_url=refused, cwd=tmp_path), "refused")
        }
        with time_machine.travel(NOW, tick=False):
            for what, (bad_url, expected) in failing.items():
                results[what] = (run_cli(None, "nightly", env={"BILLING_DB_URL": bad_url}), expected)
                results[f"{what}, --db-url"] = (run_cli(bad_url, "month-end", "--month", "2026-05"), expected)
        for what, (result, expected) in results.items():
            assert result.code == 1, f"{what}: {result.stderr}"
            assert expected in result.stderr, f"{what}: {result.stderr}"
            assert "billing-jobs: error: cannot connect to the database" in result.stderr, result.stderr
            assert_no_password(result.stdout + result.stderr, f"the output after {what}")

        malformed = {
            "no '://'": secret_url.replace("://", "//", 1),
            "a port that is not a number": url.render_as_string(hide_password=False).replace(
                f":{url.port}/", ":port/"
            ),
            "an unknown driver": url.set(drivername="nosuchdb").render_as_string(hide_password=False),
        }
        for what, bad_url in malformed.items():
            result = run_cli(None, "status", env={"BILLING_DB_URL": bad_url})
            assert result.code in (1, 2), f"{what}: {result.stderr}"
            assert "billing-jobs: " in result.stderr, result.stderr
            assert_no_password(result.stdout + result.stderr, f"the output for a URL with {what}")
    finally:
        with pg_server.admin_connection() as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(no_login)))


def _command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in sorted(group.commands.items()):
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from _command_paths(command, (*prefix, name))


def test_help_never_shows_the_password(secret_url: str, tmp_path: Path) -> None:
    paths = [(), *_command_paths(cli)]
    assert {("nightly",), ("month-end",), ("db", "upgrade"), ("schedule",), ("status",)} <= set(paths)
    for path in paths:
        for result in (
            run_cli(None, *path, "--help", env={"BILLING_DB_URL": secret_url}),
            run_cli(secret_url, *path, "--help"),
        ):
            assert result.code == 0, f"{path}: {result.stderr}"
            assert "Usage:" in result.stdout
            assert_no_password(result.stdout + result.stderr, f"billing-jobs {' '.join(path)} --help")
    top = run_process("--help", db_url=secret_url, cwd=tmp_path)
    assert "--db-url" in top.stdout
    assert_no_password(top.stdout + top.stderr, "billing-jobs --help (process)")


def test_an_error_carrying_the_url_is_masked_in_the_run_record_logs_and_status(
    secret_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The runner masks whatever a failing job's exception says, in every encoding of the password."""
    textfile = tmp_path / "billing_jobs.prom"
    settings = load_settings(write_config(tmp_path, metrics_textfile=str(textfile)))
    engine = make_engine(secret_url)
    upgrade(engine)
    capsys.readouterr()
    logs.configure("DEBUG", json=True)
    message = (
        f"could not reach {secret_url} (password={PASSWORD!r}, as a query: {quote_plus(PASSWORD)}, "
        f"libpq: host=127.0.0.1 password={quote(PASSWORD, safe='')})"
    )

    def body(_run: object) -> None:
        raise RuntimeError(message)

    try:
        with pytest.raises(RuntimeError):
            run_job(
                engine,
                settings,
                "nightly",
                period="2026-05-01..2026-05-01",
                arguments={"source": secret_url},
                body=body,
                now=datetime(2026, 6, 2, 12, tzinfo=UTC),
            )
    finally:
        engine.dispose()
    stderr = capsys.readouterr().err
    failed = [e for e in log_events(stderr) if e["event"] == "run.failed"]
    assert len(failed) == 1
    assert failed[0]["error"].startswith("RuntimeError: could not reach postgresql+psycopg://")
    assert_no_password(stderr, "the run's log")
    runs = table_text(secret_url, billing_runs)
    assert "'failed'" in runs
    assert "***" in runs
    assert_no_password(runs, "billing_runs")
    env = {"BILLING_DB_URL": secret_url, "BILLING_CONFIG": str(tmp_path / "billing.toml")}
    for args in (("runs", "--json"), ("status", "--json"), ("status",), ("runs",)):
        result = run_cli(None, *args, env=env)
        assert "could not reach" in result.stdout, result.stdout
        assert_no_password(result.stdout + result.stderr, " ".join(args))
    assert "billing_job_last_status" in textfile.read_text(encoding="utf-8")
    assert_no_password(textfile.read_text(encoding="utf-8"), "the metrics textfile")
