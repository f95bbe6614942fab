"""Chunks are sets of accounts named by id, so no collation decides what a chunk holds.

On a PostgreSQL database created with a linguistic ICU collation (`en-US`), where
`Acc-1`, `acc-2`, `_acc 3` and `Zed-4` sort quite differently from code-point order,
chunks of one and two projects must give exactly what one chunk gives on a
C-collated database: the same charges, invoices, rejects and export bytes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pg_server import PgServer
from psycopg import sql
from support import SourceData, export_text, run_cli

from billing_jobs.db.billing_tables import charge_periods, invoice_lines, invoices, rejects

ACCOUNTS = ["Acc-1", "acc-2", "_acc 3", "Zed-4", "zed-5", "a.b", "A_b", "Ärger-7", "acc-10", "ACC-9"]


def _platform(db_url: str) -> None:
    """Mixed-case, punctuated account ids; cloud usage, the waiver and rejects in each.

    Every row id is given, so two databases filled by this hold the same rows.
    """
    data = SourceData()
    for a, account in enumerate(ACCOUNTS):
        for p in range(a % 3 + 1):
            pid = f"{account}/P{p}" if p % 2 else f"{account.lower()}-p{p}"
            data.project(pid, created=f"2026-0{(a + p) % 5 + 1}-1{p} 08:00", account=account)
            if a % 2 == 0:
                data.event(pid, "2026-05-03 10:00", "published", event_id=f"ev-{pid}-pub")
                data.cloud(pid, "2026-05-04", "page_views", str(1000 * (a + 1)), usage_id=f"cl-{pid}-a")
                # Before publishing: rejected.
                data.cloud(pid, "2026-05-02", "bandwidth_gb", "1.5", usage_id=f"cl-{pid}-b")
            if p == 1:
                data.event(pid, "2026-05-10 09:00", "archived", event_id=f"ev-{pid}-arc")
                data.event(pid, "2026-05-20 00:00", "restored", event_id=f"ev-{pid}-res")
                # Not allowed (already active): rejected.
                data.event(pid, "2026-05-21 00:00", "restored", event_id=f"ev-{pid}-res2")
            for i in range(100 * (a % 4)):
                data.compute(pid, "2026-05-15 12:00", "0.1", usage_id=f"cu-{pid}-{i}")
    data.compute("nope", "2026-05-02 00:00", "1", usage_id="cu-nope")  # unknown project: rejected
    data.write_url(db_url)


def _rows(db_url: str, table: sa.Table) -> list[tuple[object, ...]]:
    skip = {"run_id", "recorded_at", "first_run_id", "first_seen_at", "created_at", "finalized_at"}
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            columns = [c for c in table.c if c.name not in skip]
            return sorted((tuple(str(v) for v in r) for r in conn.execute(sa.select(*columns))), key=repr)
    finally:
        engine.dispose()


def _bill(db_url: str, *extra: str) -> dict[str, object]:
    for args in (["nightly", "--date", "2026-05-12"], ["month-end", "--month", "2026-05"]):
        result = run_cli(db_url, *args, *extra)
        assert result.code == 0, result.stderr
    tables: dict[str, object] = {
        t.name: _rows(db_url, t) for t in (charge_periods, invoices, invoice_lines, rejects)
    }
    # The export without its finalized_at column (the run's time): byte for byte otherwise.
    tables["export"] = "\n".join(
        line.rsplit(",", 1)[0] for line in export_text(db_url, "2026-05").splitlines()
    )
    return tables


@pytest.fixture
def icu_db_url(pg_server: PgServer) -> Iterator[str]:
    """A fresh database whose default collation is ICU `en-US` (linguistic order)."""
    name = f"t_icu_{uuid.uuid4().hex}"
    with psycopg.connect(pg_server.conninfo(), autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8' LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
            ).format(sql.Identifier(name))
        )
    try:
        yield pg_server.url(name)
    finally:
        pg_server.drop_database(name)


def test_the_icu_database_really_orders_ids_linguistically(icu_db_url: str) -> None:
    engine = sa.create_engine(icu_db_url)
    try:
        with engine.connect() as conn:
            values = ", ".join(f"('{a}')" for a in ACCOUNTS)
            linguistic = [
                r[0] for r in conn.execute(sa.text(f"SELECT v FROM (VALUES {values}) t(v) ORDER BY v"))
            ]
    finally:
        engine.dispose()
    assert linguistic != sorted(ACCOUNTS)  # so the test below would catch order-based chunks


@pytest.mark.parametrize("chunk", ["1", "2"])
def test_chunks_on_an_icu_collated_database_give_what_one_chunk_gives_on_a_c_collated_one(
    icu_db_url: str, pg_db_url: str, chunk: str
) -> None:
    _platform(pg_db_url)
    reference = _bill(pg_db_url)
    _platform(icu_db_url)

    chunked = _bill(icu_db_url, "--projects-per-chunk", chunk)

    assert chunked == reference
    assert len(reference["invoice_lines"]) > 20  # type: ignore[arg-type]
    reasons = {r[2] for r in reference["rejects"]}  # type: ignore[attr-defined]
    assert {"not_published_that_day", "unknown_project"} <= reasons


@pytest.mark.parametrize("chunk", ["1", "2"])
def test_chunks_on_sqlite_give_what_one_chunk_gives(tmp_path: object, chunk: str) -> None:
    whole_url = f"sqlite:///{tmp_path}/whole.db"
    chunked_url = f"sqlite:///{tmp_path}/chunked.db"
    _platform(whole_url)
    _platform(chunked_url)

    assert _bill(chunked_url, "--projects-per-chunk", chunk) == _bill(whole_url)


def test_the_export_is_in_code_point_order_of_account_and_project_whatever_the_collation(
    icu_db_url: str,
) -> None:
    _platform(icu_db_url)
    _bill(icu_db_url, "--projects-per-chunk", "2")

    rows = [line.split(",") for line in export_text(icu_db_url, "2026-05").splitlines()[1:]]
    accounts = [r[2] for r in rows]
    assert accounts == sorted(accounts)  # Python's str order is code-point order
    assert len(set(accounts)) >= 8  # nearly every account has lines to order


_REFERENCE: dict[str, dict[str, object]] = {}


def _reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One chunk, one process: what every other way of running must give."""
    if "sqlite" not in _REFERENCE:
        url = f"sqlite:///{tmp_path_factory.mktemp('reference')}/whole.db"
        _platform(url)
        _REFERENCE["sqlite"] = _bill(url, "--workers", "1")
    return _REFERENCE["sqlite"]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunk=st.integers(min_value=1, max_value=8), workers=st.integers(min_value=1, max_value=3))
def test_any_chunk_size_and_worker_count_give_what_one_chunk_in_one_process_gives(
    tmp_path_factory: pytest.TempPathFactory, chunk: int, workers: int
) -> None:
    url = f"sqlite:///{tmp_path_factory.mktemp('chunked')}/chunked.db"
    _platform(url)

    got = _bill(url, "--projects-per-chunk", str(chunk), "--workers", str(workers))

    assert got == _reference(tmp_path_factory)


@pytest.mark.parametrize("workers", ["2"])
def test_workers_on_postgresql_give_what_one_process_gives(
    pg_db_url: str, icu_db_url: str, workers: str
) -> None:
    _platform(pg_db_url)
    reference = _bill(pg_db_url, "--workers", "1")
    _platform(icu_db_url)

    assert _bill(icu_db_url, "--projects-per-chunk", "3", "--workers", workers) == reference
