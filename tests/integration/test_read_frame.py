"""`read_frame` gives each column exactly the values the driver returned, whichever way
it turns rows into columns (one 2-D array for a read fetched in one go, column by
column where a value is itself a sequence numpy would open), on both back ends."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    LargeBinary,
    MetaData,
    String,
    Table,
    literal_column,
    select,
)

from billing_jobs.db.reads import read_frame

ROWS: list[dict[str, Any]] = [
    {"id": "p1", "name": 'é,{1}\t"x"\n', "n": 2**62, "blob": b"\x00\x01", "note": None},
    {"id": "p2", "name": "", "n": -1, "blob": None, "note": "NULL"},
    {"id": "p3", "name": "\\N", "n": 0, "blob": b"", "note": "(1, 2)"},
]


def _table(engine: Engine) -> Table:
    table = Table(
        "frame_rows",
        MetaData(),
        Column("id", String(8), primary_key=True),
        Column("name", String(64), nullable=False),
        Column("n", BigInteger, nullable=False),
        Column("blob", LargeBinary),
        Column("note", String(16)),
    )
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), ROWS)
    return table


@pytest.mark.parametrize("aggregate", [True, False], ids=["fetched-at-once", "streamed"])
def test_each_column_holds_the_drivers_values(db_engine: Engine, aggregate: bool) -> None:
    table = _table(db_engine)
    stmt = select(table).order_by(table.c.id)
    with db_engine.connect() as conn:
        frame = read_frame(conn, stmt, ints=["n"], aggregate=aggregate)
    assert frame["n"].dtype == np.int64
    assert frame["n"].tolist() == [r["n"] for r in ROWS]
    for name in ("id", "name", "note"):
        assert [None if pd.isna(v) else v for v in frame[name].tolist()] == [r[name] for r in ROWS]
    assert [None if v is None else bytes(v) for v in frame["blob"].tolist()] == [r["blob"] for r in ROWS]


@pytest.mark.parametrize("aggregate", [True, False], ids=["fetched-at-once", "streamed"])
@pytest.mark.parametrize("rows", [0, 1, 3])
def test_a_row_of_sequences_is_not_opened(db_engine: Engine, rows: int, aggregate: bool) -> None:
    """Every value of every row a sequence of one length: numpy would make a third axis
    of them (PostgreSQL's arrays; on SQLite texts stand in)."""
    table = _table(db_engine)
    postgres = db_engine.dialect.name == "postgresql"
    pair = literal_column("ARRAY[1, 2]" if postgres else "'1 2'").label("pair")
    other = literal_column("ARRAY[3, 4]" if postgres else "'3 4'").label("other")
    stmt = select(pair, other).select_from(table).order_by(table.c.id).limit(rows)
    with db_engine.connect() as conn:
        frame = read_frame(conn, stmt, aggregate=aggregate)
    assert list(frame.columns) == ["pair", "other"]
    assert frame["pair"].tolist() == [[1, 2] if postgres else "1 2"] * rows
    assert frame["other"].tolist() == [[3, 4] if postgres else "3 4"] * rows
