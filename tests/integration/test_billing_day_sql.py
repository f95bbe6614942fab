"""The billing day the database computes for an instant (`credit_reads.billing_day`,
used by the ledger's compute per account and day) equals the rule's, computed in
Python by `local_day_numbers`: at every local midnight, a microsecond either side of
it, and at random instants, across DST changes and zones with odd offsets, on both
back ends."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import pandas as pd
import pytest
from sqlalchemy import Engine, insert, select

from billing_jobs.db.credit_reads import billing_day
from billing_jobs.db.engine import make_engine
from billing_jobs.db.source_tables import compute_usage, source_metadata
from billing_jobs.rules.calendar import local_day_numbers, local_midnight_utc

FIRST, LAST = date(2026, 3, 1), date(2026, 11, 30)  # both hemispheres' DST changes
ZONES = [
    "UTC",
    "America/New_York",
    "Europe/London",
    "Australia/Lord_Howe",  # a DST change of 30 minutes
    "Asia/Kolkata",  # +05:30
    "Pacific/Chatham",  # +12:45 / +13:45
    "America/St_Johns",  # -03:30 / -02:30
]


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    source_metadata.create_all(eng, tables=[compute_usage])
    try:
        yield eng
    finally:
        eng.dispose()


def instants(zone: ZoneInfo, seed: int) -> list[datetime]:
    """Naive UTC instants of billing days FIRST..LAST in `zone`."""
    start, end = local_midnight_utc(FIRST, zone), local_midnight_utc(LAST + timedelta(days=1), zone)
    out = []
    d = FIRST
    while d <= LAST + timedelta(days=1):
        midnight = local_midnight_utc(d, zone)
        out += [midnight, midnight - timedelta(microseconds=1), midnight + timedelta(microseconds=1)]
        out.append(midnight + timedelta(hours=12))
        d += timedelta(days=1)
    rng = random.Random(seed)
    span = int((end - start).total_seconds())
    out += [
        start + timedelta(seconds=rng.randrange(span), microseconds=rng.randrange(10**6)) for _ in range(500)
    ]
    return sorted({t for t in out if start <= t < end})


@pytest.mark.parametrize("name", ZONES)
def test_the_database_puts_each_instant_on_the_rules_billing_day(engine: Engine, name: str) -> None:
    zone = ZoneInfo(name)
    times = instants(zone, seed=len(name))
    rows = [
        {"usage_id": f"u{i}", "project_id": "p", "occurred_at": t, "credits": 1} for i, t in enumerate(times)
    ]
    with engine.begin() as conn:
        conn.execute(compute_usage.delete())
        conn.execute(insert(compute_usage), rows)
    c = compute_usage.c
    with engine.connect() as conn:
        stmt = select(c.usage_id, billing_day(conn, c.occurred_at, FIRST, LAST, zone).label("day"))
        got = {u: int(d) for u, d in conn.execute(stmt)}
    expected = local_day_numbers(pd.Series(times), zone)
    wrong = [
        (t.isoformat(), got[f"u{i}"], int(e))
        for i, (t, e) in enumerate(zip(times, expected, strict=True))
        if got[f"u{i}"] != int(e)
    ]
    assert not wrong, wrong[:5]
    assert len(got) == len(times) > 1_000
