"""`billing-jobs db upgrade` creates, migrates and removes the jobs' own tables only.

The source tables live in the same database: every test creates them first
(with rows), and checks that their reflected schema and rows are exactly as
before, and that no statement that creates, alters or writes anything names them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from support import SourceData, run_cli

from billing_jobs.db.billing_tables import billing_metadata
from billing_jobs.db.engine import MIGRATIONS, downgrade, make_engine
from billing_jobs.db.source_tables import SOURCE_TABLES, source_metadata
from billing_jobs.migrations import VERSION_TABLE, include_object

SOURCE_NAMES = {t.name for t in SOURCE_TABLES}
HEAD = ScriptDirectory(str(MIGRATIONS)).get_current_head()
JOB_TABLES = {
    "billing_runs",
    "billing_locks",
    "billed_days",
    "charge_periods",
    "charge_months",
    "month_closes",
    "month_shards",
    "month_holds",
    "month_reconciles",
    "invoices",
    "invoice_lines",
    "rejects",
    "credit_lots",
    "credit_entries",
    "credit_balances",
    "credit_periods",
    "credit_refunds",
    "credit_inputs",
    "credit_lot_states",
    "invoice_series",
}
WRITING = re.compile(r"^\s*(CREATE|ALTER|DROP|INSERT|UPDATE|DELETE|TRUNCATE|COPY|COMMENT|GRANT)\b", re.I)
SOURCE_WORD = re.compile(r"\b(" + "|".join(sorted(SOURCE_NAMES)) + r")\b", re.I)


def _source_data() -> SourceData:
    data = SourceData()
    data.project("p-legacy", created="2025-11-02", account="acct-a")
    data.project("p-new", created="2026-05-03 10:00", account="acct-b")
    data.event("p-legacy", "2026-05-10 09:00", "archived")
    data.event("p-new", "2026-05-04 09:00", "published")
    data.compute("p-legacy", "2026-05-03 10:00", "0.1", count=3)
    data.compute("p-new", "2026-05-05 10:00", None)
    data.cloud("p-new", "2026-05-05", "page_views", "12345")
    return data


def _snapshot(engine: sa.Engine) -> dict[str, Any]:
    """Reflected schema and every row of the five source tables, comparable with ==."""
    inspector = sa.inspect(engine)
    snap: dict[str, Any] = {}
    with engine.connect() as conn:
        for table in SOURCE_TABLES:
            name = table.name
            snap[name] = {
                "columns": [
                    (c["name"], str(c["type"]), c["nullable"], c.get("default"))
                    for c in inspector.get_columns(name)
                ],
                "pk": inspector.get_pk_constraint(name)["constrained_columns"],
                "fks": sorted(
                    (tuple(fk["constrained_columns"]), fk["referred_table"], tuple(fk["referred_columns"]))
                    for fk in inspector.get_foreign_keys(name)
                ),
                "indexes": sorted(
                    (ix["name"], tuple(ix["column_names"]), bool(ix["unique"]))
                    for ix in inspector.get_indexes(name)
                ),
                "rows": [
                    tuple(r)
                    for r in conn.execute(sa.select(table).order_by(*table.primary_key.columns)).all()
                ],
            }
    return snap


def _tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


@contextmanager
def _statements() -> Iterator[list[str]]:
    """Every SQL statement any engine sends while the block runs."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    sa.event.listen(sa.Engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", record)


def _writes_to_source_tables(statements: list[str]) -> list[str]:
    return [s for s in statements if WRITING.match(s) and SOURCE_WORD.search(s)]


def _version(engine: sa.Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


def _differences(engine: sa.Engine) -> list[Any]:
    """What `alembic revision --autogenerate` would propose, configured like env.py."""
    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn,
            opts={
                "target_metadata": billing_metadata,
                "include_object": include_object,
                "version_table": VERSION_TABLE,
                "compare_type": True,
                "compare_server_default": True,
            },
        )
        return list(compare_metadata(ctx, billing_metadata))


def test_upgrade_from_empty_creates_exactly_the_jobs_tables_and_leaves_source_tables_alone(
    db_url: str,
) -> None:
    _source_data().write_url(db_url)
    engine = make_engine(db_url)
    try:
        before = _snapshot(engine)
        assert _tables(engine) == SOURCE_NAMES
        with _statements() as statements:
            result = run_cli(db_url, "db", "upgrade")
        assert result.code == 0, result.stderr
        assert "database schema is up to date" in result.stdout
        assert _tables(engine) == SOURCE_NAMES | JOB_TABLES | {VERSION_TABLE}
        assert _version(engine) == HEAD
        assert any(WRITING.match(s) for s in statements)  # the listener did see the DDL
        assert _writes_to_source_tables(statements) == []
        assert _snapshot(engine) == before
    finally:
        engine.dispose()


def test_upgrade_run_twice_changes_nothing_the_second_time(db_url: str) -> None:
    _source_data().write_url(db_url)
    engine = make_engine(db_url)
    try:
        assert run_cli(db_url, "db", "upgrade").code == 0
        before = _snapshot(engine)
        tables = _tables(engine)
        with _statements() as statements:
            result = run_cli(db_url, "db", "upgrade")
        assert result.code == 0, result.stderr
        assert [s for s in statements if WRITING.match(s)] == []
        assert _tables(engine) == tables
        assert _version(engine) == HEAD
        assert _snapshot(engine) == before
    finally:
        engine.dispose()


def test_downgrade_to_base_removes_only_the_jobs_tables_and_upgrade_works_again(db_url: str) -> None:
    _source_data().write_url(db_url)
    engine = make_engine(db_url)
    try:
        before = _snapshot(engine)
        assert run_cli(db_url, "db", "upgrade").code == 0
        with _statements() as statements:
            downgrade(engine, "base")
        assert _writes_to_source_tables(statements) == []
        # Alembic keeps its (now empty) version table; every table of the jobs is gone.
        assert _tables(engine) - {VERSION_TABLE} == SOURCE_NAMES
        assert _version(engine) is None
        assert _snapshot(engine) == before

        result = run_cli(db_url, "db", "upgrade")
        assert result.code == 0, result.stderr
        assert _tables(engine) == SOURCE_NAMES | JOB_TABLES | {VERSION_TABLE}
        assert _version(engine) == HEAD
        assert _snapshot(engine) == before
    finally:
        engine.dispose()


def test_models_and_migrations_agree_with_the_source_tables_in_the_same_database(db_url: str) -> None:
    _source_data().write_url(db_url)
    engine = make_engine(db_url)
    try:
        assert run_cli(db_url, "db", "upgrade").code == 0
        assert _differences(engine) == []
    finally:
        engine.dispose()


def test_the_comparison_would_notice_a_model_the_migrations_lack(db_url: str) -> None:
    """Guards the test above: the same comparison reports a drift when there is one."""
    _source_data().write_url(db_url)
    engine = make_engine(db_url)
    try:
        assert run_cli(db_url, "db", "upgrade").code == 0
        with engine.begin() as conn:
            conn.execute(sa.text("DROP INDEX ix_rejects_period"))
        diffs = _differences(engine)
        assert [(d[0], d[1].name) for d in diffs] == [("add_index", "ix_rejects_period")]
    finally:
        engine.dispose()


def test_include_object_keeps_the_source_tables_out_of_migrations() -> None:
    for table in source_metadata.sorted_tables:
        assert not include_object(table, table.name, "table", False, None)
        for column in table.columns:
            assert not include_object(column, column.name, "column", False, None)
    for table in billing_metadata.sorted_tables:
        assert include_object(table, table.name, "table", False, None)
