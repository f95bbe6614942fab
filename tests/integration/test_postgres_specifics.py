"""What PostgreSQL does for the jobs, checked on a live PostgreSQL 15 server.

- The jobs run as a role that may only read the five source tables.
- NUMERIC's NaN and infinities are rejected rows, not crashes.
- Bulk writes go through COPY; repeated and concurrent runs write each charge once.
- NUMERIC(18,4) amounts stay exact end to end, far beyond a float's 2^53.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from support import SourceData, export_rows, lines_by, reject_reasons, run_cli

from billing_jobs.db.billing_tables import billing_metadata, billing_runs, charge_periods, rejects
from billing_jobs.db.credit_reads import read_compute_days
from billing_jobs.db.engine import make_engine, serial_plans, upgrade
from billing_jobs.db.reads import plan_chunks, read_cloud_usage, read_events
from billing_jobs.db.source_tables import SOURCE_TABLES
from billing_jobs.db.writes import analyze
from billing_jobs.demo import generate_bulk

SOURCE_NAMES = [t.name for t in SOURCE_TABLES]
JOB_TABLES = [t.name for t in billing_metadata.sorted_tables]
VERSION_TABLE = "billing_alembic_version"
BILLING_JOBS = Path(sys.executable).with_name("billing-jobs")

# The grants of docs/postgresql.md. The tests first take away what PostgreSQL grants
# PUBLIC by default (CONNECT and TEMPORARY on a database, USAGE on schema public),
# so these lists are shown to be complete on their own.
LOCK_DOWN = [
    "REVOKE ALL ON DATABASE {database} FROM PUBLIC",
    "REVOKE ALL ON SCHEMA public FROM PUBLIC",
]
MIGRATE_ROLE_GRANTS = [
    "GRANT CONNECT ON DATABASE {database} TO {migrate}",
    "GRANT USAGE, CREATE ON SCHEMA public TO {migrate}",
]
JOB_ROLE_GRANTS = [
    "GRANT CONNECT ON DATABASE {database} TO {job}",
    "GRANT USAGE ON SCHEMA public TO {job}",
    "GRANT SELECT ON accounts, projects, project_events, compute_usage, cloud_usage,"
    " top_ups, redemption_codes, refund_requests TO {job}",
    "GRANT SELECT, INSERT, UPDATE, DELETE ON billing_runs, billing_locks, billed_days, charge_periods,"
    " charge_months,"
    " month_closes, month_shards, month_holds, month_reconciles, invoices, invoice_lines, rejects,"
    " credit_lots, credit_entries, credit_balances, credit_periods, credit_refunds, credit_inputs,"
    " credit_lot_states,"
    " invoice_series TO {job}",
    "GRANT SELECT ON billing_alembic_version TO {job}",
]


def _engine(url: str) -> sa.Engine:
    return sa.create_engine(url)


def _scalar(url: str, sql: str, **params: Any) -> Any:
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(sql), params).scalar_one()
    finally:
        engine.dispose()


def _execute(url: str, *statements: str) -> None:
    engine = _engine(url)
    try:
        with engine.begin() as conn:
            for sql in statements:
                conn.execute(sa.text(sql))
    finally:
        engine.dispose()


def _last_counts(url: str, job: str) -> dict[str, Any]:
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            text = conn.execute(
                sa.select(billing_runs.c.counts)
                .where(billing_runs.c.job == job, billing_runs.c.status == "succeeded")
                .order_by(billing_runs.c.started_at.desc())
                .limit(1)
            ).scalar_one()
    finally:
        engine.dispose()
    counts: dict[str, Any] = json.loads(text)
    return counts


def _upgrade(url: str) -> None:
    result = run_cli(url, "db", "upgrade")
    assert result.code == 0, result.stderr


# ---------------------------------------------------------------------------
# A role that can only read the source tables
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Roles:
    migrate: str
    job: str
    database: str
    migrate_url: str
    job_url: str

    def grant(self, statements: list[str]) -> list[str]:
        return [g.format(database=self.database, migrate=self.migrate, job=self.job) for g in statements]


@pytest.fixture
def roles(pg_db_url: str, pg_admin_url: str) -> Iterator[Roles]:
    """A migration role and a job role, LOGIN, no privileges yet (unique names, as
    roles are server-wide), dropped afterwards with all they own."""
    suffix = uuid.uuid4().hex[:8]
    url = make_url(pg_db_url)
    made = Roles(
        migrate=f"billing_migrate_{suffix}",
        job=f"billing_job_{suffix}",
        database=str(url.database),
        migrate_url=url.set(username=f"billing_migrate_{suffix}", password="dev-only").render_as_string(
            False
        ),
        job_url=url.set(username=f"billing_job_{suffix}", password="dev-only").render_as_string(False),
    )
    _execute(
        pg_admin_url,
        f"CREATE ROLE {made.migrate} LOGIN PASSWORD 'dev-only'",
        f"CREATE ROLE {made.job} LOGIN PASSWORD 'dev-only'",
    )
    try:
        yield made
    finally:
        _execute(pg_db_url, f"DROP OWNED BY {made.job}, {made.migrate}")
        _execute(pg_admin_url, f"DROP ROLE {made.job}", f"DROP ROLE {made.migrate}")


def _role_data() -> SourceData:
    data = SourceData()
    data.project("p-legacy", created="2025-11-02", account="acct-a")
    data.project("p-busy", created="2025-12-01", account="acct-a")
    data.project("p-site", created="2026-01-10", account="acct-b")
    data.compute("p-busy", "2026-06-03 10:00", "0.1", count=300)
    data.event("p-site", "2026-05-20 08:00", "published")
    data.cloud("p-site", "2026-06-15", "page_views", "1000")
    data.cloud("p-site", "2026-06-16", "bandwidth_gb", "2.5")
    return data


def _table_owners(url: str) -> dict[str, str]:
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public'")
            )
            return {str(name): str(owner) for name, owner in rows.all()}
    finally:
        engine.dispose()


def test_the_jobs_run_as_a_role_that_only_reads_the_source_tables(pg_db_url: str, roles: Roles) -> None:
    _role_data().write_url(pg_db_url)  # the platform's tables, owned by the superuser
    _execute(pg_db_url, *roles.grant(LOCK_DOWN), *roles.grant(MIGRATE_ROLE_GRANTS))
    _upgrade(roles.migrate_url)
    owners = _table_owners(pg_db_url)
    assert {owners[t] for t in [*JOB_TABLES, VERSION_TABLE]} == {roles.migrate}
    assert {owners[t] for t in SOURCE_NAMES} == {"postgres"}
    _execute(pg_db_url, *roles.grant(JOB_ROLE_GRANTS))

    nightly = run_cli(roles.job_url, "nightly", "--date", "2026-06-15")
    assert nightly.code == 0, nightly.stderr
    month_end = run_cli(roles.job_url, "month-end", "--month", "2026-06")
    assert month_end.code == 0, month_end.stderr
    rows = export_rows(roles.job_url, "2026-06")

    totals = lines_by(rows, "project_id", "line_type")
    assert totals[("p-legacy", "storage_fee")] == Decimal(29)
    assert totals[("p-busy", "storage_fee")] == Decimal(29)
    assert totals[("p-busy", "storage_refund")] == Decimal(-29)
    assert totals[("p-site", "cloud_page_views")] == Decimal(1)
    assert totals[("p-site", "cloud_bandwidth")] == Decimal("1.25")
    assert _scalar(pg_db_url, "SELECT count(*) FROM billing_runs WHERE status = 'succeeded'") == 2
    reconciled = run_cli(roles.job_url, "reconcile", "--month", "2026-06", "--workers", "1")
    assert reconciled.code == 0, reconciled.stdout + reconciled.stderr
    assert _scalar(pg_db_url, "SELECT status FROM month_reconciles WHERE period = '2026-06'") == "ok"

    engine = _engine(roles.job_url)
    try:
        for sql, table in (
            ("INSERT INTO accounts VALUES ('x', 'team', 'x', now())", "accounts"),
            ("UPDATE compute_usage SET credits = 0", "compute_usage"),
            ("DELETE FROM cloud_usage", "cloud_usage"),
        ):
            with pytest.raises(sa.exc.ProgrammingError, match=f"permission denied for table {table}"):
                _run_in(engine, sql)
        with pytest.raises(sa.exc.ProgrammingError, match="permission denied for schema public"):
            _run_in(engine, "CREATE TABLE scratch (x int)")
    finally:
        engine.dispose()


def _run_in(engine: sa.Engine, sql: str) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(sql))


def test_db_upgrade_as_the_job_role_fails_and_writes_nothing(pg_db_url: str, roles: Roles) -> None:
    """Since PostgreSQL 15 not every role may create in `public`: the job's role
    cannot migrate, and says so; the migration role then can."""
    _role_data().write_url(pg_db_url)
    _execute(
        pg_db_url,
        *roles.grant(LOCK_DOWN),
        *roles.grant(MIGRATE_ROLE_GRANTS),
        *roles.grant(JOB_ROLE_GRANTS[:3]),
    )

    result = run_cli(roles.job_url, "db", "upgrade")
    assert result.code == 1
    assert "permission denied for schema public" in result.stderr
    assert set(_table_owners(pg_db_url)) == set(SOURCE_NAMES)
    _upgrade(roles.migrate_url)
    assert set(_table_owners(pg_db_url)) == {*SOURCE_NAMES, *JOB_TABLES, VERSION_TABLE}


def test_the_job_schema_needs_no_sequences_to_grant(pg_db_url: str) -> None:
    _role_data().write_url(pg_db_url)
    _upgrade(pg_db_url)
    assert _scalar(pg_db_url, "SELECT count(*) FROM pg_sequences WHERE schemaname = 'public'") == 0


# ---------------------------------------------------------------------------
# NaN and infinities
# ---------------------------------------------------------------------------


def test_infinite_amounts_cannot_even_be_stored_in_the_source_columns(pg_db_url: str) -> None:
    """PostgreSQL 14+ has numeric infinities, but NUMERIC(18,4) refuses them: of the
    non-finite values only NaN can reach the jobs (and is rejected, below)."""
    SourceData().project("p1", created="2025-11-02").write_url(pg_db_url)
    for value in ("Infinity", "-Infinity"):
        for sql in (
            f"INSERT INTO compute_usage VALUES ('cu-x', 'p1', '2026-06-04 10:00', '{value}'::numeric)",
            f"INSERT INTO cloud_usage VALUES ('cl-x', 'p1', '2026-06-15', 'page_views', '{value}'::numeric)",
        ):
            with pytest.raises(sa.exc.DataError, match="cannot hold an infinite value"):
                _execute(pg_db_url, sql)
    assert _scalar(pg_db_url, "SELECT 'Infinity'::numeric > 0") is True  # the type itself has them


def test_nan_amounts_are_rejected_and_the_projects_valid_rows_are_billed(pg_db_url: str) -> None:
    data = SourceData()
    data.project("p1", created="2025-11-02")
    data.event("p1", "2026-05-20 08:00", "published")
    data.compute("p1", "2026-06-03 10:00", "10", count=3)
    data.cloud("p1", "2026-06-15", "page_views", "1000")
    data.cloud("p1", "2026-06-16", "bandwidth_gb", "2")
    data.write_url(pg_db_url)
    _execute(
        pg_db_url,
        "INSERT INTO compute_usage VALUES ('cu-nan', 'p1', '2026-06-04 10:00', 'NaN'::numeric)",
        # NaN next to a valid row of the same project, day and metric, and alone on a day.
        "INSERT INTO cloud_usage VALUES ('cl-nan-1', 'p1', '2026-06-15', 'page_views', 'NaN'::numeric)",
        "INSERT INTO cloud_usage VALUES ('cl-nan-2', 'p1', '2026-06-17', 'bandwidth_gb', 'NaN'::numeric)",
    )

    nightly = run_cli(pg_db_url, "nightly", "--date", "2026-06-15")
    assert nightly.code == 0, nightly.stderr
    assert _last_counts(pg_db_url, "nightly")["rejects"] == 1  # the NaN cloud row of the 15th
    month_end = run_cli(pg_db_url, "month-end", "--month", "2026-06")
    assert month_end.code == 0, month_end.stderr

    found = reject_reasons(pg_db_url)
    assert found == {
        ("compute_usage", "cu-nan", "non_finite_amount"),
        ("cloud_usage", "cl-nan-1", "non_finite_amount"),
        ("cloud_usage", "cl-nan-2", "non_finite_amount"),
    }
    totals = lines_by(export_rows(pg_db_url, "2026-06"), "project_id", "line_type")
    assert totals == {
        ("p1", "storage_fee"): Decimal(29),
        ("p1", "storage_refund"): Decimal(-29),  # the valid 30 credits of compute count
        ("p1", "cloud_page_views"): Decimal(1),  # 1000 views; the NaN row adds nothing
        ("p1", "cloud_bandwidth"): Decimal(1),  # 2 GB on the 16th; nothing for the 17th
    }
    assert _last_counts(pg_db_url, "month-end")["rejects"] == 3


# ---------------------------------------------------------------------------
# COPY for bulk writes, ON CONFLICT for idempotent ones
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_month_end_of_20k_projects_writes_its_charges_with_copy(
    pg_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine(pg_db_url)
    try:
        summary = generate_bulk(
            engine, projects=20_000, usage_rows_per_month=40_000, months=[(2026, 6)], published_share=0.02
        )
    finally:
        engine.dispose()
    assert summary.projects == 20_000
    copies: list[str] = []
    copy = psycopg.Cursor.copy

    def spy(self: psycopg.Cursor[Any], statement: Any, *args: Any, **kwargs: Any) -> Any:
        copies.append(str(statement))
        return copy(self, statement, *args, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "copy", spy)

    # One process: the statements are watched in this one (workers would send them elsewhere).
    result = run_cli(pg_db_url, "month-end", "--month", "2026-06", "--workers", "1")
    assert result.code == 0, result.stderr

    counts = _last_counts(pg_db_url, "month-end")
    written = _scalar(
        pg_db_url,
        "SELECT count(*) FROM charge_periods WHERE first_day BETWEEN '2026-06-01' AND '2026-06-30'",
    )
    days = _scalar(
        pg_db_url,
        "SELECT sum(days) FROM charge_periods WHERE first_day BETWEEN '2026-06-01' AND '2026-06-30'",
    )
    assert written == counts["rows_inserted"]
    assert days == counts["storage_charges"] + counts["cloud_charges"]
    assert days > 15_000 * 20  # most projects are charged most days
    assert written * 3 < days  # stored as periods: a month of storage fee is one row
    # The charges travel by COPY, and so do the invoice lines.
    assert any(re.match(r'COPY "?charge_periods"? ', s) for s in copies), copies
    assert any(re.match(r'COPY "?invoice_lines"? ', s) for s in copies), copies
    # The invoices say the same as the charges, project by project.
    mismatches = _scalar(
        pg_db_url,
        """
        SELECT count(*) FROM (
          SELECT project_id, sum(days) * 10000 AS days, sum(amount_units * days) AS amount
          FROM charge_periods WHERE charge_type = 'storage_fee' GROUP BY project_id
        ) d FULL JOIN (
          SELECT project_id, quantity_units AS days, amount_units AS amount
          FROM invoice_lines WHERE line_type = 'storage_fee' AND amount_units <> 0
        ) i USING (project_id)
        WHERE d.days IS DISTINCT FROM i.days OR d.amount IS DISTINCT FROM i.amount
        """,
    )
    assert mismatches == 0


def test_the_chunks_plan_their_reads_without_parallel_workers(pg_db_url: str) -> None:
    """The job's workers keep the cores busy; a chunk's reads of the usage and of the
    ledger are planned in one process (`serial_plans`), and only for their own
    transaction: the session's setting is back to the server's afterwards."""
    engine = _engine(pg_db_url)
    try:
        generate_bulk(
            engine, projects=400, usage_rows_per_month=4_000, months=[(2026, 5)], published_share=0.3
        )
        with engine.connect() as conn:
            default = conn.exec_driver_sql("SHOW max_parallel_workers_per_gather").scalar_one()
    finally:
        engine.dispose()
    assert default != "0"
    seen: dict[str, set[str]] = {}

    def watch(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        read = re.search(r"\bFROM (compute_usage|cloud_usage|credit_entries)\b", statement)
        if read and "= ANY" in statement:  # a chunk's read: its accounts or projects named
            setting = cursor.connection.execute("SHOW max_parallel_workers_per_gather").fetchone()[0]
            seen.setdefault(read.group(1), set()).add(setting)

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", watch)
    try:
        # One process: the statements are watched in this one.
        first = run_cli(pg_db_url, "month-end", "--month", "2026-05", "--workers", "1")
        again = run_cli(pg_db_url, "month-end", "--month", "2026-05", "--workers", "1")
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", watch)
    assert first.code == 0, first.stderr
    assert again.code == 0, again.stderr
    assert seen == {"compute_usage": {"0"}, "cloud_usage": {"0"}, "credit_entries": {"0"}}
    engine = _engine(pg_db_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW max_parallel_workers_per_gather").scalar_one() == default
    finally:
        engine.dispose()


# The indexes docs/postgresql.md asks the platform for, on the two usage tables.
USAGE_INDEXES = [
    "CREATE INDEX ON compute_usage (occurred_at)",
    "CREATE INDEX ON compute_usage (project_id, occurred_at) INCLUDE (credits)",
    "CREATE INDEX ON cloud_usage (usage_date)",
    "CREATE INDEX ON cloud_usage (project_id, usage_date) INCLUDE (metric, quantity)",
    "CREATE INDEX ON projects (account_id)",
    "CREATE INDEX ON project_events (project_id)",
]


def test_a_chunks_usage_reads_find_each_projects_rows_through_its_index(pg_db_url: str) -> None:
    """A chunk's reads of the usage and of the events go from its projects to their rows
    through the `(project_id, ...)` indexes, for a day as for a month
    (`db.engine.through_indexes`).
    Left to itself, the planner reads one day by scanning the day's rows of every
    project through the date index and hash-joins them with the chunk's projects, so
    that each chunk reads the whole day. The join settings are the session's own again
    after the reads."""
    engine = _engine(pg_db_url)
    try:
        generate_bulk(
            engine, projects=2_000, usage_rows_per_month=20_000, months=[(2026, 5)], published_share=0.5
        )
        with engine.begin() as conn:
            for ddl in USAGE_INDEXES:
                conn.exec_driver_sql(ddl)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
    finally:
        engine.dispose()
    plans: list[str] = []

    def explain(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        read = re.search(r"\bFROM (compute_usage|cloud_usage|project_events)\b", statement)
        if read and re.match(r"\s*(SELECT|DECLARE)", statement):
            # A streamed read is a cursor's query: its SELECT explained alone.
            query = re.sub(r'^\s*DECLARE "[^"]+" .*?CURSOR .*?FOR ', "", statement, flags=re.DOTALL)
            rows = cursor.connection.execute("EXPLAIN " + query, parameters).fetchall()
            plans.append("\n".join(r[0] for r in rows))

    engine = make_engine(pg_db_url)
    sa.event.listen(engine, "before_cursor_execute", explain)
    try:
        with engine.connect() as conn:
            serial_plans(conn)
            chunk = plan_chunks(conn, 200)[0]
            read_events(conn, chunk)
            for first, last in (
                (date(2026, 5, 14), date(2026, 5, 14)),
                (date(2026, 5, 1), date(2026, 5, 31)),
            ):
                read_cloud_usage(conn, first, last, chunk)
                read_compute_days(conn, first, last, ZoneInfo("UTC"), chunk)
            settings = [
                conn.exec_driver_sql(f"SHOW {name}").scalar_one()
                for name in ("enable_hashjoin", "enable_mergejoin")
            ]
    finally:
        engine.dispose()
    assert len(plans) == 5
    for plan in plans:
        assert "Hash Join" not in plan, plan
        assert "Merge Join" not in plan, plan
        assert "Nested Loop" in plan, plan
        assert re.search(
            r"Index (Only )?Scan using \w+ on (compute_usage|cloud_usage|project_events)", plan
        ), plan
    assert settings == ["on", "on"]


def _nightly_process(url: str, day: str) -> subprocess.Popen[str]:
    env = {**os.environ, "BILLING_DB_URL": url}
    return subprocess.Popen(
        [str(BILLING_JOBS), "nightly", "--date", day],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_concurrent_and_repeated_nightly_runs_write_each_charge_once(pg_db_url: str) -> None:
    data = SourceData()
    for a in range(30):
        for p in range(5):
            data.project(f"p-{a:02d}-{p}", created="2025-12-01", account=f"acct-{a:02d}")
        data.event(f"p-{a:02d}-0", "2026-06-01 00:00", "published")
        data.cloud(f"p-{a:02d}-0", "2026-06-10", "domains", "2")
        data.compute(f"p-{a:02d}-1", "2026-06-10 12:00", "NaN")
    data.write_url(pg_db_url)
    _upgrade(pg_db_url)

    first, second = _nightly_process(pg_db_url, "2026-06-10"), _nightly_process(pg_db_url, "2026-06-10")
    outcomes = [(p.wait(timeout=300), p.communicate()) for p in (first, second)]
    codes = sorted(code for code, _ in outcomes)
    assert codes in ([0, 0], [0, 75]), outcomes  # 75: the other run held the lock
    assert run_cli(pg_db_url, "nightly", "--date", "2026-06-10").code == 0

    engine = _engine(pg_db_url)
    try:
        with engine.connect() as conn:
            keys = conn.execute(
                sa.select(
                    charge_periods.c.project_id, charge_periods.c.charge_type, charge_periods.c.first_day
                )
            ).all()
            billed = conn.execute(sa.text("SELECT count(*) FROM billed_days")).scalar_one()
            reject_rows = conn.execute(sa.select(sa.func.count()).select_from(rejects)).scalar_one()
    finally:
        engine.dispose()
    # A storage fee per project (June 10 to the month's end), a domains fee per site.
    assert len(keys) == len(set(keys)) == 150 + 30
    assert billed == 1
    assert reject_rows == 30
    again = _last_counts(pg_db_url, "nightly")
    assert again["rows_inserted"] == again["rows_deleted"] == 0
    assert again["days_billed"] == again["rejects_new"] == 0
    assert again["storage_charges"] == 150


# ---------------------------------------------------------------------------
# Exact NUMERIC
# ---------------------------------------------------------------------------

MAX_NUMERIC = "99999999999999.9999"  # the largest NUMERIC(18,4)
MAX_ROW = "1000000000.0000"  # the largest amount one usage row may hold (reads.MAX_AMOUNT)


def test_numeric_amounts_up_to_the_row_limit_sum_exactly(pg_db_url: str) -> None:
    data = SourceData()
    # Compute: K = 29.9999 (no waiver) and K = 30.0000 (waiver), each reached through
    # amounts at the row limit.
    data.project("p-short", created="2025-11-02")
    data.compute("p-short", "2026-06-02 10:00", MAX_ROW)
    data.compute("p-short", "2026-06-03 10:00", "-999999999.9990")
    data.compute("p-short", "2026-06-04 10:00", "29.9989")
    data.project("p-exact", created="2025-11-02")
    data.compute("p-exact", "2026-06-02 10:00", MAX_ROW)
    data.compute("p-exact", "2026-06-03 10:00", "-999999999.9990")
    data.compute("p-exact", "2026-06-04 10:00", "29.9990")
    # Cloud: 1,000 rows on one day sum to about 1e16 units, past 2^53.
    data.project("p-site", created="2025-11-02")
    data.event("p-site", "2026-05-20 08:00", "published")
    quantities = [Decimal("999999999.9999") - Decimal(i) / 10_000 for i in range(1000)]
    for q in quantities:
        data.cloud("p-site", "2026-06-15", "bandwidth_gb", str(q))
    data.cloud("p-site", "2026-06-16", "domains", MAX_ROW)
    data.write_url(pg_db_url)

    result = run_cli(pg_db_url, "month-end", "--month", "2026-06")
    assert result.code == 0, result.stderr
    rows = export_rows(pg_db_url, "2026-06")
    totals = lines_by(rows, "project_id", "line_type")
    quantity = {(r["project_id"], r["line_type"]): Decimal(r["quantity"]) for r in rows}

    assert ("p-short", "storage_refund") not in totals
    assert totals[("p-exact", "storage_refund")] == Decimal(-29)
    bandwidth = sum(quantities, Decimal(0))
    assert bandwidth * 10_000 > 2**53
    assert float(bandwidth) != bandwidth  # a float sum could not have got it right
    assert quantity[("p-site", "cloud_bandwidth")] == bandwidth == Decimal("999999999949.9500")
    assert totals[("p-site", "cloud_bandwidth")] == bandwidth / 2
    assert quantity[("p-site", "cloud_domains")] == Decimal(MAX_ROW)
    assert totals[("p-site", "cloud_domains")] == Decimal("100000000.0000")  # 0.1 each


def test_amounts_past_the_row_limit_are_rejected_never_wrapped_or_crashed(pg_db_url: str) -> None:
    """Ten rows of the largest NUMERIC(18,4) would leave BIGINT's range of units together."""
    data = SourceData()
    data.project("p-big", created="2025-11-02")
    for i in range(10):
        data.compute("p-big", "2026-06-02 10:00", MAX_NUMERIC, usage_id=f"cu-big-{i}")
    data.compute("p-big", "2026-06-03 10:00", "-1000000000.0001", usage_id="cu-big-neg")
    data.compute("p-big", "2026-06-04 10:00", "30", usage_id="cu-ok")
    data.event("p-big", "2026-05-20 08:00", "published")
    for i in range(10):
        data.cloud("p-big", "2026-06-15", "page_views", MAX_NUMERIC, usage_id=f"cl-big-{i}")
    data.cloud("p-big", "2026-06-15", "page_views", "1000", usage_id="cl-ok")
    data.write_url(pg_db_url)

    result = run_cli(pg_db_url, "month-end", "--month", "2026-06")

    assert result.code == 0, result.stderr
    totals = lines_by(export_rows(pg_db_url, "2026-06"), "project_id", "line_type")
    assert totals[("p-big", "storage_refund")] == Decimal(-29)  # K = 30 from the one good row
    assert totals[("p-big", "cloud_page_views")] == Decimal(1)
    found = {(row_id, reason) for _, row_id, reason in reject_reasons(pg_db_url)}
    expected = {(f"cu-big-{i}", "amount_out_of_range") for i in range(10)}
    expected |= {(f"cl-big-{i}", "amount_out_of_range") for i in range(10)}
    expected.add(("cu-big-neg", "amount_out_of_range"))
    assert found == expected


def test_statistics_are_refreshed_only_after_a_large_share_of_a_table_changed(pg_db_url: str) -> None:
    """A night's charges are a small part of a month's: ANALYZE runs when the written rows
    reach a tenth of what the statistics count (or the table was never analyzed)."""
    engine = make_engine(pg_db_url)
    try:
        upgrade(engine)
        rows = [
            {
                "project_id": f"p-{i:04d}",
                "charge_type": "storage_fee",
                "first_day": date(2026, 5, 1),
                "last_day": date(2026, 5, 1),
                "days": 1,
                "account_id": "a",
                "quantity_units": 10_000,
                "amount_units": 10_000,
                "run_id": "r",
                "recorded_at": datetime(2026, 5, 2),  # noqa: DTZ001  # naive UTC, as stored
            }
            for i in range(1000)
        ]
        with engine.begin() as conn:
            conn.execute(charge_periods.insert(), rows)
        with engine.begin() as conn:
            assert analyze(conn, charge_periods, changed=1000) == 1  # never analyzed: always
        with engine.begin() as conn:
            assert analyze(conn, charge_periods, changed=99) == 0  # 99 < 10% of 1,000
            assert analyze(conn, charge_periods, changed=100) == 1
            assert analyze(conn, charge_periods) == 1  # no count given: always
    finally:
        engine.dispose()
