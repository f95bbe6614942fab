"""The database fixtures give real, isolated databases on SQLite and PostgreSQL 15."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest
import sqlalchemy as sa


def _probe_table(metadata: sa.MetaData) -> sa.Table:
    return sa.Table(
        "probe",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("label", sa.String(40), nullable=False),
    )


def test_db_url_gives_empty_usable_database(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    try:
        assert not sa.inspect(engine).has_table("probe")
        metadata = sa.MetaData()
        probe = _probe_table(metadata)
        with engine.begin() as conn:
            metadata.create_all(conn)
            conn.execute(sa.insert(probe), [{"id": 2, "label": "beta"}, {"id": 1, "label": "a"}])
        with engine.connect() as conn:
            rows = conn.execute(sa.select(probe.c.id, probe.c.label).order_by(probe.c.id)).all()
        assert [tuple(row) for row in rows] == [(1, "a"), (2, "beta")]
    finally:
        engine.dispose()


def test_db_url_back_end_matches_param(db_url: str, request: pytest.FixtureRequest) -> None:
    backend = request.node.callspec.params["db_url"]
    engine = sa.create_engine(db_url)
    try:
        assert engine.dialect.name == backend
        with engine.connect() as conn:
            assert conn.execute(sa.select(sa.literal(1))).scalar_one() == 1
    finally:
        engine.dispose()


def test_postgresql_server_is_version_15(pg_db_url: str) -> None:
    engine = sa.create_engine(pg_db_url)
    try:
        with engine.connect() as conn:
            version_num = int(conn.execute(sa.text("SHOW server_version_num")).scalar_one())
        assert version_num // 10000 == 15
        assert engine.dialect.server_version_info is not None
        assert engine.dialect.server_version_info[0] == 15
    finally:
        engine.dispose()


def test_postgresql_numeric_nan_round_trips(pg_db_url: str) -> None:
    engine = sa.create_engine(pg_db_url)
    metadata = sa.MetaData()
    amounts = sa.Table(
        "amounts",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("amount", sa.Numeric(18, 6), nullable=False),
    )
    try:
        with engine.begin() as conn:
            metadata.create_all(conn)
            conn.execute(
                sa.insert(amounts),
                [{"id": 1, "amount": Decimal("NaN")}, {"id": 2, "amount": Decimal("12.5")}],
            )
        with engine.connect() as conn:
            stored = conn.execute(sa.select(amounts.c.amount).where(amounts.c.id == 1)).scalar_one()
            # PostgreSQL treats NUMERIC NaN as equal to itself, so it can be matched.
            matched = (
                conn.execute(sa.select(amounts.c.id).where(amounts.c.amount == Decimal("NaN")))
                .scalars()
                .all()
            )
            literal = conn.execute(sa.text("SELECT 'NaN'::numeric")).scalar_one()
        assert isinstance(stored, Decimal)
        assert stored.is_nan()
        assert matched == [1]
        assert isinstance(literal, Decimal)
        assert literal.is_nan()
    finally:
        engine.dispose()


def test_pg_admin_url_can_manage_roles(pg_admin_url: str, pg_db_url: str) -> None:
    role = f"r_{uuid.uuid4().hex}"
    admin = sa.create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE ROLE "{role}" LOGIN'))
        try:
            as_role = sa.make_url(pg_db_url).set(username=role)
            engine = sa.create_engine(as_role)
            try:
                with engine.connect() as conn:
                    assert conn.execute(sa.text("SELECT current_user")).scalar_one() == role
            finally:
                engine.dispose()
        finally:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP ROLE "{role}"'))
    finally:
        admin.dispose()
