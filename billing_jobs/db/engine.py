"""Engines and migrations.

Alembic is imported by the functions that migrate, not at import: a command that only
reads (`status`, `runs`, `--help`) starts without it. Whether a database is at the
newest revision is read from the version table and compared with `SCHEMA_HEAD` (a
test checks that it is the migrations' head).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, String, column, create_engine, event, inspect, select, table, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import NullPool

from billing_jobs import errors
from billing_jobs.redact import remember_url, scrub

if TYPE_CHECKING:
    from alembic.config import Config

SCHEMA_HEAD = "0017"  # the newest migration's revision
MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
VERSION_TABLE = "billing_alembic_version"


DatabaseUrlError = errors.DatabaseUrlError


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout and foreign keys.

    Its password is masked from here on in logs, run records and errors (`redact`).
    """
    remember_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseUrlError(f"bad database URL {scrub(url)!r}") from None
    try:
        if parsed.get_backend_name() == "sqlite":
            engine = create_engine(parsed, poolclass=NullPool, connect_args={"timeout": 60})

            @event.listens_for(engine, "connect")
            def _pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute("PRAGMA busy_timeout=60000")
                cur.close()

            return engine
        engine = create_engine(parsed, pool_pre_ping=True)
        if parsed.get_backend_name() == "postgresql":
            event.listen(engine, "connect", _plan_for_whole_results)
        return engine
    except Exception as exc:  # unknown dialect or driver
        raise DatabaseUrlError(f"cannot use database URL {parsed!r}: {scrub(str(exc))}") from None


SESSION_WORK_MEM = "256MB"


def _plan_for_whole_results(dbapi_conn, _record):  # type: ignore[no-untyped-def]
    """Plan server-side cursors (reads stream with `yield_per`) for reading every row.

    PostgreSQL plans a cursor for its first 10% of rows by default
    (`cursor_tuple_fraction = 0.1`). On freshly loaded, not yet analyzed source
    tables that picks nested-loop plans for the aggregating reads that are
    quadratic (minutes instead of a fraction of a second for 40,000 rows). The
    jobs always read a cursor to the end.

    `work_mem` is raised for the job's own sessions: the month's aggregations
    (one group per project) otherwise spill to disk in many batches.
    """
    autocommit = dbapi_conn.autocommit
    dbapi_conn.autocommit = True
    with dbapi_conn.cursor() as cur:
        cur.execute("SET cursor_tuple_fraction = 1.0")
        cur.execute(f"SET work_mem = '{SESSION_WORK_MEM}'")
    dbapi_conn.autocommit = autocommit


def alembic_config(engine: Engine) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    # Alembic's options are ConfigParser values: a `%` (as in a URL-encoded password) is doubled.
    url = engine.url.render_as_string(hide_password=False).replace("%", "%%")
    cfg.set_main_option("sqlalchemy.url", url)
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Create or migrate the jobs' own tables (safe to repeat, and to run at once:
    a second upgrade waits for the first, then finds nothing left to do)."""
    from alembic import command

    cfg = alembic_config(engine)
    with engine.begin() as conn:
        _one_migration_at_a_time(conn)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


MIGRATION_LOCK_KEY = 0x62696C6C  # PostgreSQL advisory lock key of migrations ("bill")


def _one_migration_at_a_time(conn: Connection) -> None:
    """Hold a lock until the migration transaction ends (first runs on a new database race)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    elif conn.dialect.name == "sqlite":
        # The database's write lock from the start, so the version check and the DDL that
        # follows are one transaction; the busy timeout makes a second upgrade wait.
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def downgrade(engine: Engine, revision: str) -> None:
    from alembic import command

    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def schema_revision(conn: Connection) -> str | None:
    """The revision the jobs' tables are migrated to (None: never migrated)."""
    if not inspect(conn).has_table(VERSION_TABLE):
        return None
    found = conn.execute(select(column("version_num", String)).select_from(table(VERSION_TABLE)))
    versions: list[str] = list(found.scalars())
    return versions[0] if len(versions) == 1 else None


def schema_is_current(engine: Engine) -> bool:
    """Whether the jobs' tables are migrated to the newest revision."""
    with engine.connect() as conn:
        return schema_revision(conn) == SCHEMA_HEAD


def serial_plans(conn: Connection) -> None:
    """Plan the rest of `conn`'s transaction without parallel workers (PostgreSQL;
    `SET LOCAL`, so the setting ends with the transaction).

    For the reads of a chunk, which the job's own workers run side by side to keep
    the cores busy. A chunk names a share of the accounts; given parallel workers,
    the planner may rather scan the whole month's usage by date and hash-join it
    with the chunk's projects, so that every chunk reads the whole month (at 100k
    projects in 10 chunks, a chunk's cloud read took 0.57 s in three processes
    against 0.24 s in one through the projects' index).
    """
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET LOCAL max_parallel_workers_per_gather = 0")


@contextmanager
def through_indexes(conn: Connection) -> Iterator[None]:
    """Plan the statements run inside without hash or merge joins (PostgreSQL): a
    chunk's reads of the usage and of the events, each project's rows found through
    the table's `(project_id, ...)` index; the deletes of stored periods sent as
    arrays, each row found through the primary key.

    Serial (`serial_plans`), the planner may rather scan the day's or the month's rows
    by date and hash-join them with the chunk's projects, so that every chunk reads
    all of them: at 1M projects a chunk's read of one day of cloud usage took 0.18 s
    that way against 0.04 s through the index. `SET LOCAL`, reset when the statements are
    done (after a failure the transaction ends, and the setting with it).
    """
    if conn.dialect.name != "postgresql":
        yield
        return
    conn.exec_driver_sql("SET LOCAL enable_hashjoin = off")
    conn.exec_driver_sql("SET LOCAL enable_mergejoin = off")
    yield
    conn.exec_driver_sql("RESET enable_hashjoin")
    conn.exec_driver_sql("RESET enable_mergejoin")


@contextmanager
def snapshot(engine: Engine) -> Iterator[Connection]:
    """A connection whose reads all see one committed state of the database.

    PostgreSQL: a read-only REPEATABLE READ transaction. SQLite (WAL): a read
    transaction, begun explicitly, sees the database as of its first read.
    """
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        elif conn.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN")
        try:
            yield conn
        finally:
            conn.rollback()
