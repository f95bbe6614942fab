"""A run deletes a stored period only if it is still exactly as the run read it, on
both back ends (PostgreSQL: one statement per batch, the rows sent as arrays)."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pandas as pd
import pytest
from sqlalchemy import select

from billing_jobs.db import writes
from billing_jobs.db.billing_tables import charge_periods
from billing_jobs.db.engine import make_engine, upgrade
from billing_jobs.rules.calendar import day_number

NOW = datetime(2026, 6, 2, 3, 0, tzinfo=UTC).replace(tzinfo=None)


def _row(
    project: str,
    charge_type: str,
    first: date,
    last: date,
    amount: int,
    daily: str | None,
    account: str = "acct-1",
) -> dict:
    return {
        "project_id": project,
        "charge_type": charge_type,
        "first_day": first,
        "last_day": last,
        "days": (last - first).days + 1,
        "account_id": account,
        "quantity_units": amount,
        "amount_units": amount,
        "daily": daily,
        "run_id": "r1",
        "recorded_at": NOW,
    }


def _as_read(rows: list[dict]) -> pd.DataFrame:
    """Rows as a run reads them: days as day numbers."""
    frame = pd.DataFrame(rows)
    frame["first_day"] = [day_number(d) for d in frame["first_day"]]
    frame["last_day"] = [day_number(d) for d in frame["last_day"]]
    return frame


@pytest.mark.parametrize(
    "ids",
    [
        pytest.param(("p1", "p2", "p3", "acct-1"), id="plain-ids"),  # every column one array text
        pytest.param(("é,{1}", 'p "2"', "p\\3", "NULL"), id="awkward-ids"),  # some sent as lists
    ],
)
@pytest.mark.parametrize("batch", [1, 2, 50_000])
def test_only_periods_still_as_read_are_deleted(
    db_url: str, batch: int, ids: tuple[str, str, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL gets each column of a batch as one array text where JSON's quoting is
    the array's own, as a list otherwise: either way each row is matched on every
    column, NULL `daily` included."""
    monkeypatch.setattr(writes, "DELETE_BATCH", batch)
    monkeypatch.setattr(writes, "SQL_BATCH", batch)
    p1, p2, p3, account = ids
    may1, may31 = date(2026, 5, 1), date(2026, 5, 31)
    stored = [
        _row(p1, "storage_fee", may1, may31, 10000, None, account),
        _row(p2, "storage_fee", may1, date(2026, 5, 9), 10000, None, account),
        _row(p2, "cloud_domains", may1, may31, 3000, "0 1000 1000 1 1000 1000 30 1000 1000", account),
        _row(p3, "cloud_domains", may1, may31, 2000, "0 1000 1000 30 1000 1000", account),
        _row(p3, "storage_fee", may1, may31, 10000, None, account),
    ]
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        with engine.begin() as conn:
            conn.execute(charge_periods.insert(), stored)
        read = [dict(r) for r in stored[:4]]
        read[1]["last_day"] = date(2026, 5, 10)  # p2's storage run changed since it was read
        read[3]["daily"] = "0 1000 1000"  # p3's month form too
        with engine.begin() as conn:
            deleted = writes.delete_periods(conn, _as_read(read))
            if conn.dialect.name == "postgresql":  # the planner as before for the rest
                assert conn.exec_driver_sql("SHOW enable_hashjoin").scalar() == "on"
                assert conn.exec_driver_sql("SHOW enable_mergejoin").scalar() == "on"
            left = conn.execute(
                select(charge_periods.c.project_id, charge_periods.c.charge_type).order_by(
                    charge_periods.c.project_id, charge_periods.c.charge_type
                )
            ).all()
        assert deleted == 2
        assert sorted(tuple(r) for r in left) == sorted(
            [(p2, "storage_fee"), (p3, "cloud_domains"), (p3, "storage_fee")]
        )
        with engine.begin() as conn:  # the same rows again: already gone, nothing deleted
            assert writes.delete_periods(conn, _as_read(stored[:1] + stored[2:3])) == 0
    finally:
        engine.dispose()
