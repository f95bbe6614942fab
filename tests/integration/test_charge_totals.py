"""`charge_totals` always equals the sums of the daily charges it summarises."""

from __future__ import annotations

from datetime import UTC, date, datetime

import sqlalchemy as sa
from support import SourceData, run_cli

from billing_jobs.db.billing_tables import charge_totals, daily_charges
from billing_jobs.db.engine import make_engine, upgrade

SUMMARY = sa.text(
    "SELECT project_id, charge_type, account_id, COUNT(*), SUM(amount_units), SUM(quantity_units)"
    " FROM daily_charges WHERE charge_date >= :first AND charge_date <= :last"
    " GROUP BY project_id, charge_type, account_id"
)


def _pairs(
    db_url: str, period: str, first: str, last: str
) -> tuple[set[tuple[object, ...]], set[tuple[object, ...]]]:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            ct = charge_totals.c
            kept = {
                tuple(r)
                for r in conn.execute(
                    sa.select(
                        ct.project_id, ct.charge_type, ct.account_id, ct.n, ct.amount, ct.quantity
                    ).where(ct.period == period)
                )
            }
            summed = {tuple(r) for r in conn.execute(SUMMARY, {"first": first, "last": last})}
            return kept, summed
    finally:
        engine.dispose()


def test_totals_follow_nightly_charges_month_end_and_a_back_dated_change(db_url: str) -> None:
    data = SourceData()
    data.project("p1", created="2025-11-02").project("p2", created="2025-11-02", account="acct-2")
    data.event("p2", "2026-05-03 10:00", "published")
    data.cloud("p2", "2026-05-04", "bandwidth_gb", "1.2345")
    data.write_url(db_url)
    for day in ("2026-05-03", "2026-05-04"):
        assert run_cli(db_url, "nightly", "--date", day).code == 0
    kept, summed = _pairs(db_url, "2026-05", "2026-05-01", "2026-05-31")
    assert kept == summed
    assert ("p2", "cloud_bandwidth", "acct-2", 1, 6173, 12345) in kept

    assert run_cli(db_url, "month-end", "--month", "2026-05").code == 0
    kept, summed = _pairs(db_url, "2026-05", "2026-05-01", "2026-05-31")
    assert kept == summed
    assert ("p1", "storage_fee", "acct-1", 29, 290000, 290000) in kept

    SourceData().event("p1", "2026-05-01 00:00", "archived").write_url(db_url)  # late, back-dated
    assert run_cli(db_url, "month-end", "--month", "2026-05").code == 0
    kept, summed = _pairs(db_url, "2026-05", "2026-05-01", "2026-05-31")
    assert kept == summed
    assert not any(r[0] == "p1" and r[1] == "storage_fee" for r in kept)


def test_the_migration_fills_totals_from_charges_written_before_it(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine, "0001")
        with engine.begin() as conn:
            conn.execute(
                sa.insert(daily_charges),
                [
                    {
                        "project_id": "p1",
                        "charge_type": "storage_fee",
                        "charge_date": date(2026, 5, d),
                        "account_id": "acct-1",
                        "quantity_units": 10000,
                        "amount_units": 10000,
                        "run_id": "r",
                        "recorded_at": datetime(2026, 6, 1, tzinfo=UTC).replace(tzinfo=None),
                    }
                    for d in (1, 2, 31)
                ],
            )
        upgrade(engine)
        with engine.connect() as conn:
            rows = conn.execute(sa.select(charge_totals)).all()
    finally:
        engine.dispose()
    assert [tuple(r) for r in rows] == [("p1", "storage_fee", "2026-05", "acct-1", 3, 30000, 30000, 340000)]
