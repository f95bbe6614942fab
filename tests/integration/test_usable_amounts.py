"""The aggregates' filter for usable amounts and the rejects' reasons partition the rows.

`reads.usable_amount` (a few comparisons, evaluated per row by the aggregates) and
`reads.amount_problem` (the reason a row is rejected) are two definitions of one
thing: every row is exactly one of usable or rejected, on both back ends, for every
kind of value a NUMERIC column can hold there.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from billing_jobs.db.engine import make_engine
from billing_jobs.db.reads import MAX_AMOUNT, amount_problem, usable_amount

BOUNDARIES = [
    "0",
    "0.0001",
    "-0.0001",
    "12.5",
    str(MAX_AMOUNT),
    f"{MAX_AMOUNT}.0001",
    f"-{MAX_AMOUNT}",
    f"-{MAX_AMOUNT}.0001",
    "99999999999999.9999",
    "-99999999999999.9999",
    "NULL",
]
SQLITE_ONLY = ["'abc'", "'12abc'", "''", "x'00'", "9e999", "-9e999", "'1e3'", "1e-9"]
POSTGRESQL_ONLY = ["'NaN'"]


@pytest.mark.parametrize("signed", [True, False], ids=["credits", "quantity"])
def test_every_value_is_either_usable_or_has_a_reason_never_both_nor_neither(
    db_url: str, signed: bool
) -> None:
    engine = make_engine(db_url)
    extra = SQLITE_ONLY if engine.dialect.name == "sqlite" else POSTGRESQL_ONLY
    values = BOUNDARIES + extra
    table = sa.Table(
        "amount_probe",
        sa.MetaData(),
        sa.Column("k", sa.Integer, primary_key=True),
        sa.Column("v", sa.Numeric(18, 4)),
    )
    try:
        with engine.begin() as conn:
            table.create(conn)
            for k, value in enumerate(values):
                conn.execute(sa.text(f"INSERT INTO amount_probe VALUES ({k}, {value})"))
            usable = usable_amount(table.c.v, signed=signed)
            problem = amount_problem(conn, table.c.v)
            rows = conn.execute(
                sa.select(
                    table.c.k,
                    sa.case((usable, 1), else_=0),
                    problem,
                    sa.case((table.c.v < 0, 1), else_=0),
                ).order_by(table.c.k)
            ).all()
    finally:
        engine.dispose()
    assert len(rows) == len(values)
    for k, is_usable, reason, negative in rows:
        rejected = reason is not None or (not signed and negative == 1)
        assert bool(is_usable) != rejected, (values[k], is_usable, reason, negative)
    usable_values = {values[k] for k, is_usable, _, _ in rows if is_usable}
    expected = {"0", "0.0001", "12.5", str(MAX_AMOUNT)} | ({"-0.0001", f"-{MAX_AMOUNT}"} if signed else set())
    if engine.dialect.name == "sqlite":
        expected |= {"'1e3'", "1e-9"}  # numeric text and a tiny float are numbers there
    assert usable_values == expected
