"""A chunk's charges as the store holds them: the storage fee's runs are made from its
charged days directly, and must be exactly the canonical form of the days the rules
charge (`rules.periods.from_days` of every charged day, built here from the rules'
own per-day outputs), for a whole month and for a nightly window that bills the
storage fee ahead."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import date
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, select

from billing_jobs.db.engine import make_engine, upgrade
from billing_jobs.db.source_tables import accounts
from billing_jobs.db.sql import Chunk
from billing_jobs.demo import generate_bulk
from billing_jobs.frames import pd
from billing_jobs.jobs.compute import ChunkResult, compute_chunk
from billing_jobs.rules import periods
from billing_jobs.rules.calendar import Month, day_number
from billing_jobs.settings import Settings
from tests.support import SourceData


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    path: Path = tmp_path_factory.mktemp("chunk") / "bulk.db"
    engine = make_engine(f"sqlite:///{path}")
    generate_bulk(
        engine,
        projects=400,
        usage_rows_per_month=4_000,
        months=[(2026, 5), (2026, 6)],
        published_share=0.3,
        projects_per_account=5,
    )
    upgrade(engine)
    try:
        yield engine
    finally:
        engine.dispose()


def _days_of(result: ChunkResult) -> pd.DataFrame:
    """Every charged day, from the rules' per-day outputs: the storage days charged
    (first..storage_last) and the cloud fees' days."""
    account = dict(zip(result.projects["project_id"], result.projects["account_id"], strict=True))
    charged = result.storage_charged
    storage = pd.DataFrame(
        {
            "project_id": charged["project_id"],
            "account_id": [account[p] for p in charged["project_id"]],
            "charge_type": "storage_fee",
            "day": charged["day"].astype(np.int64),
            "quantity_units": np.int64(10_000),
            "amount_units": charged["amount_units"].astype(np.int64),
        }
    )
    cloud = pd.DataFrame(
        {
            "project_id": result.cloud["project_id"],
            "account_id": [account[p] for p in result.cloud["project_id"]],
            "charge_type": result.cloud["line_type"],
            "day": result.cloud["day"].astype(np.int64),
            "quantity_units": result.cloud["quantity_units"].astype(np.int64),
            "amount_units": result.cloud["amount_units"].astype(np.int64),
        }
    )
    return pd.concat([storage, cloud], ignore_index=True)


def _sorted(frame: pd.DataFrame, key: list[str]) -> list[tuple[object, ...]]:
    return sorted(tuple(r) for r in frame[key].astype(object).itertuples(index=False))


@pytest.mark.parametrize(
    ("first", "last", "storage_last"),
    [
        (None, None, None),  # a month-end
        (date(2026, 5, 10), date(2026, 5, 12), date(2026, 5, 31)),  # a nightly billing ahead
    ],
)
def test_the_chunks_periods_are_the_canonical_form_of_its_charged_days(
    engine: Engine, first: date | None, last: date | None, storage_last: date | None
) -> None:
    with engine.connect() as conn:
        ids = tuple(sorted(a for (a,) in conn.execute(select(accounts.c.account_id))))
        result = compute_chunk(
            conn,
            Settings(),
            Month.parse("2026-05"),
            Chunk(ids[: len(ids) // 2]),
            first=first,
            last=last,
            whole_month=first is None,
            storage_last=storage_last,
        )
    days = _days_of(result)
    statuses = set(result.storage["status"])
    assert {"charged", "free_legacy_month"} <= statuses or {"charged", "cap_reached"} <= statuses, statuses
    assert len(result.cloud) > 100
    assert len(days) > 1_000

    assert _sorted(result.periods, periods.COLUMNS) == _sorted(periods.from_days(days), periods.COLUMNS)
    assert _sorted(periods.to_days(result.periods), periods.DAY_COLUMNS) == _sorted(days, periods.DAY_COLUMNS)
    assert _sorted(result.charges, periods.DAY_COLUMNS) == _sorted(days, periods.DAY_COLUMNS)
    through = day_number(last) if last else day_number(date(2026, 5, 31))
    billed = days.loc[days["day"] <= through]
    storage = billed["charge_type"] == "storage_fee"
    assert result.counts() == {
        "storage_charges": int(storage.sum()),
        "storage_units": int(billed.loc[storage, "amount_units"].sum()),
        "cloud_charges": int((~storage).sum()),
        "cloud_units": int(billed.loc[~storage, "amount_units"].sum()),
    }
    if storage_last is not None:
        ahead = days.loc[days["charge_type"] == "storage_fee", "day"]
        assert days.loc[days["charge_type"] != "storage_fee", "day"].max() <= through < ahead.max()


def test_a_gap_and_a_partial_day_under_the_cap_start_new_runs(tmp_path: Path) -> None:
    """Archived May 10 to May 20 (a gap), and a cap of 12.5 at 1 a day (the 13th charged
    day is charged 0.5): four runs, each day charged as the rules say."""
    engine = make_engine(f"sqlite:///{tmp_path / 'gap.db'}")
    try:
        data = SourceData().account("acct-1")
        data.project("p1", created="2026-04-01", account="acct-1").project("p2", created="2026-04-01")
        data.event("p1", "2026-05-10 12:00", "archived").event("p1", "2026-05-20 12:00", "restored")
        data.write(engine)
        upgrade(engine)
        settings = replace(Settings(), monthly_cap=Decimal("12.5"))
        with engine.connect() as conn:
            result = compute_chunk(conn, settings, Month.parse("2026-05"), Chunk(("acct-1",)))
    finally:
        engine.dispose()
    days = _days_of(result)
    assert _sorted(result.periods, periods.COLUMNS) == _sorted(periods.from_days(days), periods.COLUMNS)
    may = day_number(date(2026, 5, 1))
    runs = [
        (p, int(f) - may + 1, int(e) - may + 1, int(m))
        for p, f, e, m in result.periods[["project_id", "first_day", "last_day", "amount_units"]].itertuples(
            index=False
        )
    ]
    assert sorted(runs) == [
        ("p1", 1, 10, 10_000),
        ("p1", 20, 21, 10_000),
        ("p1", 22, 22, 5_000),
        ("p2", 1, 12, 10_000),
        ("p2", 13, 13, 5_000),
    ]
