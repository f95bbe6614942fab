"""Shared fixtures for the billing_jobs test suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pg_server import ENV_URL, PgServer, PgServerError, env_flag, start_or_connect
from sqlalchemy import Engine

from billing_jobs.db.engine import make_engine

# ---------------------------------------------------------------------------
# Databases: SQLite and a throwaway PostgreSQL 15 server (see tests/pg_server.py)
# ---------------------------------------------------------------------------

_PG_FIXTURES = frozenset({"pg_server", "pg_admin_url", "pg_db_url"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that use a PostgreSQL-only fixture get the ``postgres`` marker, so
    ``-m "not postgres"`` leaves them out like the postgresql ``db_url`` cases."""
    for item in items:
        if _PG_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """PostgreSQL server for this test session (one per xdist worker).

    Uses the server at ``BILLING_TEST_PG_URL`` when that is set; otherwise starts
    a private PostgreSQL 15 server in a temporary directory and stops it at the
    end of the session. If no server can be had, PostgreSQL tests fail when
    ``CI`` is true and are skipped otherwise.
    """
    try:
        server = start_or_connect()
    except PgServerError as exc:
        if env_flag("CI"):
            pytest.fail(f"PostgreSQL test server unavailable: {exc}", pytrace=False)
        pytest.skip(
            f"PostgreSQL test server unavailable ({exc}); install PostgreSQL 15 "
            f"or set {ENV_URL} to an existing server"
        )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_admin_url(pg_server: PgServer) -> str:
    """SQLAlchemy URL of the server's ``postgres`` database as superuser
    (for creating roles and the like)."""
    return pg_server.url()


@pytest.fixture
def pg_db_url(pg_server: PgServer) -> Iterator[str]:
    """SQLAlchemy URL of a fresh, empty PostgreSQL database, dropped after the
    test (connections still open to it are cut off then)."""
    name = pg_server.create_database()
    try:
        yield pg_server.url(name)
    finally:
        pg_server.drop_database(name)


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
    ]
)
def db_url(request: pytest.FixtureRequest) -> str:
    """SQLAlchemy URL of an empty database, once per back end: a SQLite file in
    the test's tmp_path, and a fresh PostgreSQL database (see ``pg_db_url``).
    Dispose of engines made from it before the test ends."""
    if request.param == "sqlite":
        tmp_path: Path = request.getfixturevalue("tmp_path")
        return f"sqlite:///{tmp_path / 'billing.db'}"
    url: str = request.getfixturevalue("pg_db_url")
    return url


@pytest.fixture
def db_engine(db_url: str) -> Iterator[Engine]:
    """An engine on `db_url` (the jobs' own `make_engine`), disposed when the test ends."""
    engine = make_engine(db_url)
    try:
        yield engine
    finally:
        engine.dispose()
