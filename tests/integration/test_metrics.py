"""Prometheus metrics: from the run records to the textfile, the Pushgateway and stdout."""

from __future__ import annotations

import http.server
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from support import SourceData, holding_writer_lock, run_cli, ts

from billing_jobs.db.billing_tables import billed_days, billing_runs
from billing_jobs.metrics import JobMetrics, build_registry, render

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition text: (name, labels) -> value."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def write_config(tmp_path: Path, **monitoring: str) -> str:
    """Settings with promotions off (so one day charges), plus `[monitoring]` values."""
    lines = [
        "[storage_fee]",
        'effective_from = "2026-05-01"',
        "[promotions]",
        "new_project_free_months = 0",
        "legacy_free_months = 0",
        "[monitoring]",
        *(f'{key} = "{val}"' for key, val in monitoring.items()),
    ]
    path = tmp_path / "billing.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def source_data(db_url: str) -> None:
    data = SourceData()
    data.project("p1", created="2026-01-10")
    data.project("p2", created="2026-02-01", account="acct-2")
    data.event("p1", "2026-05-01 10:00", "published")
    data.cloud("p1", "2026-05-03", "page_views", "12345")  # 12.345 credits
    data.compute("ghost", "2026-05-03 10:00", "1")  # unknown project: rejected
    data.write_url(db_url)


def nightly_run(db_url: str) -> tuple[str, dict[str, int], datetime]:
    """The one nightly run recorded: its id, counts and end."""
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                sa.select(billing_runs.c.run_id, billing_runs.c.counts, billing_runs.c.finished_at).where(
                    billing_runs.c.job == "nightly", billing_runs.c.status == "succeeded"
                )
            ).one()
    finally:
        engine.dispose()
    return row.run_id, json.loads(row.counts), row.finished_at


# --- The registry, pure --------------------------------------------------------------------------


def test_amounts_are_exact_integer_units_until_the_exposition_turns_them_into_credits() -> None:
    job = JobMetrics(
        job="month-end",
        last_status="succeeded",
        last_run_seconds=2.5,
        last_run_finished_at=ts("2026-06-01 04:00:03"),
        last_success_at=ts("2026-06-01 04:00:03"),
        success_counts={
            "storage_charges": 7,
            "storage_units": 123_456_789,
            "cloud_charges": 2,
            "cloud_units": 6173,
            "refund_units": -290_000,
            "rejects": 3,
        },
    )
    found = samples(render(build_registry([job])))
    assert (
        value(found, "billing_job_amount_credits", billing_job="month-end", kind="storage_fee") == 12345.6789
    )
    assert value(found, "billing_job_amount_credits", billing_job="month-end", kind="cloud") == 0.6173
    assert value(found, "billing_job_amount_credits", billing_job="month-end", kind="storage_refund") == -29.0
    assert value(found, "billing_job_rows_charged", billing_job="month-end", charge_type="storage_fee") == 7
    assert value(found, "billing_job_rejects", billing_job="month-end") == 3
    assert value(found, "billing_job_last_success_timestamp_seconds", billing_job="month-end") == (
        datetime(2026, 6, 1, 4, 0, 3, tzinfo=UTC).timestamp()
    )


def test_a_job_that_never_succeeded_has_a_status_but_no_success_or_amount_series() -> None:
    job = JobMetrics(
        job="nightly", last_status="failed", last_run_seconds=1.0, last_run_finished_at=ts("2026-06-01")
    )
    found = samples(render(build_registry([job])))
    assert value(found, "billing_job_last_status", billing_job="nightly", status="failed") == 1
    assert value(found, "billing_job_last_status", billing_job="nightly", status="succeeded") == 0
    names = {name for name, _ in found}
    assert "billing_job_last_success_timestamp_seconds" not in names
    assert "billing_job_amount_credits" not in names
    assert "billing_job_rejects" not in names


# --- Textfile after a real run -------------------------------------------------------------------


def test_a_nightly_run_writes_a_textfile_holding_its_numbers(db_url: str, tmp_path: Path) -> None:
    source_data(db_url)
    textfile = tmp_path / "textfile" / "billing_jobs.prom"
    textfile.parent.mkdir()
    config = write_config(tmp_path, metrics_textfile=str(textfile))

    result = run_cli(db_url, "--config", config, "nightly", "--date", "2026-05-03")

    assert result.code == 0, result.stderr
    _, counts, finished_at = nightly_run(db_url)
    found = samples(textfile.read_text(encoding="utf-8"))
    job = {"billing_job": "nightly"}
    assert value(found, "billing_job_last_status", **job, status="succeeded") == 1
    assert value(found, "billing_job_last_status", **job, status="failed") == 0
    assert value(found, "billing_job_last_success_timestamp_seconds", **job) == (
        finished_at.replace(tzinfo=UTC).timestamp()
    )
    assert value(found, "billing_job_last_run_seconds", **job) > 0
    # two projects, one storage fee each; one cloud charge of 12345 page views
    assert value(found, "billing_job_rows_charged", **job, charge_type="storage_fee") == 2
    assert value(found, "billing_job_rows_charged", **job, charge_type="cloud") == 1
    assert value(found, "billing_job_amount_credits", **job, kind="storage_fee") == 2.0
    assert value(found, "billing_job_amount_credits", **job, kind="cloud") == 12.345
    assert value(found, "billing_job_rejects", **job) == counts["rejects"] >= 1
    assert list(textfile.parent.iterdir()) == [textfile]  # no temporary file left behind


def test_the_metrics_command_prints_what_the_textfile_holds(db_url: str, tmp_path: Path) -> None:
    source_data(db_url)
    textfile = tmp_path / "billing_jobs.prom"
    config = write_config(tmp_path, metrics_textfile=str(textfile))
    assert run_cli(db_url, "--config", config, "nightly", "--date", "2026-05-03").code == 0

    printed = run_cli(db_url, "metrics")

    assert printed.code == 0, printed.stderr
    assert printed.stdout == textfile.read_text(encoding="utf-8")
    assert (
        value(samples(printed.stdout), "billing_job_rows_charged", billing_job="nightly", charge_type="cloud")
        == 1
    )


def test_a_run_locked_out_shows_as_locked_and_keeps_the_last_success_time(
    db_url: str, tmp_path: Path
) -> None:
    source_data(db_url)
    textfile = tmp_path / "billing_jobs.prom"
    config = write_config(tmp_path, metrics_textfile=str(textfile))
    assert run_cli(db_url, "--config", config, "nightly", "--date", "2026-05-03").code == 0
    _, _, finished_at = nightly_run(db_url)
    with holding_writer_lock(db_url, since="2026-05-04"):
        locked = run_cli(db_url, "--config", config, "nightly", "--date", "2026-05-04")

    assert locked.code == 75
    found = samples(textfile.read_text(encoding="utf-8"))
    assert value(found, "billing_job_last_status", billing_job="nightly", status="locked") == 1
    assert value(found, "billing_job_last_status", billing_job="nightly", status="succeeded") == 0
    assert value(found, "billing_job_last_success_timestamp_seconds", billing_job="nightly") == (
        finished_at.replace(tzinfo=UTC).timestamp()
    )


def test_a_textfile_that_cannot_be_written_is_a_warning_not_a_failed_run(db_url: str, tmp_path: Path) -> None:
    source_data(db_url)
    config = write_config(tmp_path, metrics_textfile=str(tmp_path / "missing" / "billing_jobs.prom"))

    result = run_cli(db_url, "--config", config, "nightly", "--date", "2026-05-03")

    assert result.code == 0, result.stderr
    assert "metrics.textfile_failed" in result.stderr
    assert billed(db_url) == 1


def test_the_metrics_command_on_a_database_without_runs_prints_no_samples(db_url: str) -> None:
    printed = run_cli(db_url, "metrics")
    assert printed.code == 0, printed.stderr
    assert samples(printed.stdout) == {}
    assert "# TYPE billing_job_last_success_timestamp_seconds gauge" in printed.stdout


# --- Pushgateway ---------------------------------------------------------------------------------


@dataclass
class FakePushgateway:
    url: str
    received: list[tuple[str, str, str]] = field(default_factory=list)  # method, path, body


@pytest.fixture
def pushgateway() -> Iterator[FakePushgateway]:
    """An HTTP server on 127.0.0.1 that records pushes and answers 200, like a Pushgateway."""
    gateway = FakePushgateway(url="")

    class Handler(http.server.BaseHTTPRequestHandler):
        def _record(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode("utf-8")
            gateway.received.append((self.command, self.path, body))
            self.send_response(200)
            self.end_headers()

        do_PUT = _record
        do_POST = _record

        def log_message(self, format: str, *args: object) -> None:
            return None

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    gateway.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield gateway
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_nightly_run_pushes_its_metrics_to_the_pushgateway(
    db_url: str, tmp_path: Path, pushgateway: FakePushgateway
) -> None:
    source_data(db_url)
    config = write_config(tmp_path, pushgateway_url=pushgateway.url)

    result = run_cli(db_url, "--config", config, "nightly", "--date", "2026-05-03")

    assert result.code == 0, result.stderr
    assert len(pushgateway.received) == 1
    method, path, body = pushgateway.received[0]
    assert method == "PUT"  # replaces this job's group only
    assert path == "/metrics/job/billing_jobs/billing_job/nightly"
    found = samples(body)
    assert value(found, "billing_job_last_status", billing_job="nightly", status="succeeded") == 1
    assert value(found, "billing_job_amount_credits", billing_job="nightly", kind="cloud") == 12.345
    assert {dict(labels)["billing_job"] for _, labels in found} == {"nightly"}


def test_an_unreachable_pushgateway_does_not_fail_the_run(db_url: str, tmp_path: Path) -> None:
    source_data(db_url)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = write_config(tmp_path, pushgateway_url=f"http://127.0.0.1:{port}")

    result = run_cli(db_url, "--config", config, "nightly", "--date", "2026-05-03")

    assert result.code == 0, result.stderr
    assert "metrics.push_failed" in result.stderr
    assert '"level": "warning"' in next(line for line in result.stderr.splitlines() if "push_failed" in line)
    assert billed(db_url) == 1


def billed(db_url: str) -> int:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(billed_days)).scalar_one())
    finally:
        engine.dispose()
