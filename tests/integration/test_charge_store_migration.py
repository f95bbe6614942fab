"""`db upgrade` turns a database written by the version that stored one charge row per
project and day (migration 0011) into charges stored as periods, in place.

The fixture `tests/fixtures/v0011/billing.db.xz` was written by that version (see
`tests/fixtures/v0011/README.md`): the demo's 8 accounts, March to September closed
in order with their credits ledger, then nightly for October 1..12. Next to it, what
that version printed: every closed month's invoice export and ledger export, two
`explain --json`, its daily charges; and, after `nightly --date 2026-10-13` and
`month-end --month 2026-10` on a copy, October's exports and the daily charges then.

On PostgreSQL the same database is rebuilt: the demo's source rows (same seed), the
jobs' tables at revision 0011, and the fixture's rows copied into them.
"""

from __future__ import annotations

import csv
import io
import json
import lzma
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import time_machine
from support import charge_days, run_cli

from billing_jobs.db.engine import downgrade, make_engine, upgrade
from billing_jobs.db.source_tables import SOURCE_TABLES
from billing_jobs.frames import pd
from billing_jobs.migrations import VERSION_TABLE, charge_forms
from billing_jobs.rules import periods
from billing_jobs.rules.calendar import day_number

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "v0011"
CLOSED = [f"2026-{m:02d}" for m in range(3, 10)]
EXPLAINED = [("prj-0001-01", "2026-06"), ("prj-0002-02", "2026-09")]


@pytest.fixture(autouse=True)
def clock() -> Iterator[None]:
    """November 2, 2026: October is over, the jobs' runs stamp this day."""
    with time_machine.travel(datetime(2026, 11, 2, 3, 0, tzinfo=UTC), tick=True):
        yield


def _unpacked(tmp_path: Path) -> Path:
    path = tmp_path / "v0011.db"
    with lzma.open(FIXTURE / "billing.db.xz") as packed, open(path, "wb") as out:
        shutil.copyfileobj(packed, out)
    return path


def _load(db_url: str, tmp_path: Path) -> str:
    """The fixture's database at `db_url`: the file itself on SQLite; on PostgreSQL the
    demo's source rows, the jobs' tables at 0011, and the fixture's rows in them."""
    path = _unpacked(tmp_path)
    if db_url.startswith("sqlite"):
        target = Path(db_url.removeprefix("sqlite:///"))
        shutil.copyfile(path, target)
        return db_url
    demo = run_cli(db_url, "demo", "--accounts", "8", "--as-of", "2026-10-31", "--bare")
    assert demo.code == 0, demo.stderr
    source = sa.create_engine(f"sqlite:///{path}")
    target_engine = make_engine(db_url)
    try:
        upgrade(target_engine, "0011")  # the jobs' tables as that version had them
        if "daily_charges" not in sa.inspect(target_engine).get_table_names():
            downgrade(target_engine, "0011")  # the demo command created the newest ones
        theirs, ours = sa.MetaData(), sa.MetaData()
        theirs.reflect(source)
        skip = {t.name for t in SOURCE_TABLES} | {VERSION_TABLE}
        names = [t.name for t in theirs.sorted_tables if t.name not in skip]
        ours.reflect(target_engine, only=names)
        with source.connect() as read, target_engine.begin() as write:
            for name in names:
                rows = [dict(r._mapping) for r in read.execute(sa.select(theirs.tables[name]))]
                if rows:
                    write.execute(ours.tables[name].insert(), rows)
    finally:
        source.dispose()
        target_engine.dispose()
    return db_url


def _expected_days(name: str) -> list[tuple[Any, ...]]:
    with lzma.open(FIXTURE / name) as packed:
        text = packed.read().decode()
    return sorted((p, t, d, a, int(q), int(m)) for p, t, d, a, q, m in csv.reader(io.StringIO(text)))


def _tables(db_url: str) -> set[str]:
    engine = sa.create_engine(db_url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _out(db_url: str, *args: str) -> str:
    result = run_cli(db_url, *args)
    assert result.code == 0, result.stderr
    return result.stdout


def _without_finalized_at(export: str) -> list[list[str]]:
    return [row[:-1] for row in csv.reader(io.StringIO(export))]


def _assert_closed_months_unchanged(db_url: str) -> None:
    for month in CLOSED:
        assert _out(db_url, "export", "--month", month) == (FIXTURE / f"invoices-{month}.csv").read_text()
        assert (
            _out(db_url, "credits", "export", "--month", month)
            == (FIXTURE / f"ledger-{month}.csv").read_text()
        )
    for project, month in EXPLAINED:
        shown = _out(db_url, "explain", "--project", project, "--month", month, "--json")
        assert shown == (FIXTURE / f"explain-{project}-{month}.json").read_text()
    assert charge_days(db_url) == _expected_days("daily_charges.csv.xz")


def test_upgrade_keeps_every_closed_month_and_every_day_charged(db_url: str, tmp_path: Path) -> None:
    _load(db_url, tmp_path)
    assert "daily_charges" in _tables(db_url)

    assert run_cli(db_url, "db", "upgrade").code == 0

    tables = _tables(db_url)
    assert "charge_periods" in tables
    assert "daily_charges" not in tables
    _assert_closed_months_unchanged(db_url)
    stored = _query(db_url, "SELECT count(*), sum(days) FROM charge_periods")[0]
    expected = _expected_days("daily_charges.csv.xz")
    assert stored[1] == len(expected) == 18_204
    # A run of equal storage-fee days is one row; a cloud fee's month one per account.
    months = {(r[0], r[1], r[2][:7], r[3]) for r in expected if r[1] != "storage_fee"}
    assert _count_forms(db_url) == (len(months), len(months))
    assert stored[0] < stored[1] * 0.2, stored
    assert charge_days(db_url) == expected
    assert _compute_inputs(db_url) == _FIXTURE_INPUTS
    # Every month that holds charges is marked so (0017): its next run reads them back.
    marked = {p for (p,) in _query(db_url, "SELECT period FROM charge_months")}
    assert marked == {r[2][:7] for r in expected}
    assert len(marked) == 8  # the fixture's months, from 2026-03
    reconciled = run_cli(db_url, "reconcile", "--since", "2026-03")
    assert reconciled.code == 0, reconciled.stdout + reconciled.stderr
    # The migrated rows are the jobs' own canonical form: a re-close rewrites none.
    reclose = run_cli(db_url, "month-end", "--month", "2026-09", "--workers", "1")
    assert reclose.code == 0, reclose.stderr
    summary = next(e for e in map(json.loads, _log_lines(reclose.stderr)) if e["event"] == "run.summary")
    assert (summary["rows_inserted"], summary["rows_deleted"]) == (0, 0)
    assert run_cli(db_url, "db", "upgrade").code == 0  # again: nothing to do
    _assert_closed_months_unchanged(db_url)


# The fixture's ledger inputs: compute per account and day, one row each at 0011.
_FIXTURE_INPUTS = (1_150, 7, 8)  # (days, rows per account at most, accounts)


def _compute_inputs(db_url: str) -> tuple[int, int, int]:
    """The stored compute inputs, after 0016 one row per account and month: (the days
    they hold, the most rows an account has, the accounts)."""
    rows = _query(db_url, "SELECT account_id, day, daily FROM credit_inputs WHERE source = 'compute'")
    per_account: dict[str, int] = {}
    days = 0
    for account, _day, daily in rows:
        assert daily, "every compute input is in the month form"
        days += len(daily.split()) // 2
        per_account[account] = per_account.get(account, 0) + 1
    return days, max(per_account.values()), len(per_account)


def _log_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("{")]


def _count_forms(db_url: str) -> tuple[int, int]:
    """Cloud-fee rows, and those in the month form."""
    query = "SELECT count(*), count(daily) FROM charge_periods WHERE charge_type <> 'storage_fee'"
    return tuple(_query(db_url, query)[0])


def _query(db_url: str, query: str) -> list[Any]:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(query)).all())
    finally:
        engine.dispose()


def test_a_downgrade_to_runs_and_an_upgrade_again_keep_every_day(db_url: str, tmp_path: Path) -> None:
    """0013 down to 0012 gives back the runs 0012 made (9,522 rows for the 18,204
    days); up again, the month forms and every closed month are as before."""
    _load(db_url, tmp_path)
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        months = _count_forms(db_url)
        downgrade(engine, "0012")
        with engine.connect() as conn:
            runs = conn.execute(sa.text("SELECT count(*), sum(days) FROM charge_periods")).one()
        assert tuple(runs) == (9_522, 18_204)
        upgrade(engine)
    finally:
        engine.dispose()
    assert _count_forms(db_url) == months
    assert charge_days(db_url) == _expected_days("daily_charges.csv.xz")
    _assert_closed_months_unchanged(db_url)


def test_after_the_upgrade_the_jobs_go_on_as_the_old_version_did(db_url: str, tmp_path: Path) -> None:
    _load(db_url, tmp_path)
    assert run_cli(db_url, "db", "upgrade").code == 0

    _out(db_url, "nightly", "--date", "2026-10-13", "--workers", "1")
    _out(db_url, "month-end", "--month", "2026-10", "--workers", "2")

    export = _out(db_url, "export", "--month", "2026-10")
    assert _without_finalized_at(export) == _without_finalized_at(
        (FIXTURE / "invoices-2026-10.csv").read_text()
    )
    ledger = _out(db_url, "credits", "export", "--month", "2026-10")
    assert ledger == (FIXTURE / "ledger-2026-10.csv").read_text()
    assert charge_days(db_url, billed_only=True) == _expected_days("daily_charges_after_october.csv.xz")
    _assert_closed_months_unchanged_but_days(db_url)


def _assert_closed_months_unchanged_but_days(db_url: str) -> None:
    for month in CLOSED:
        assert _out(db_url, "export", "--month", month) == (FIXTURE / f"invoices-{month}.csv").read_text()


def _upgrade_process(db_url: str, **extra: str) -> subprocess.CompletedProcess[bytes]:
    """`billing-jobs db upgrade` in a process of its own (`extra`: more environment)."""
    env = {**os.environ, "BILLING_DB_URL": db_url, **extra}
    command = [sys.executable, "-m", "billing_jobs", "db", "upgrade"]
    return subprocess.run(command, env=env, capture_output=True, timeout=300, check=False)


@pytest.mark.parametrize("revision", ["0012", "0013", "0014", "0016", "0017"])
def test_an_upgrade_killed_inside_the_migration_leaves_the_old_store_and_can_run_again(
    db_url: str, tmp_path: Path, revision: str
) -> None:
    """Killed inside any of the migrations (0012: runs; 0013: cloud fees per month;
    0014: the ledger entries' primary key; 0016: the ledger's compute inputs per month;
    0017: the months that hold charges),
    the upgrade's one transaction rolls back to the old version's store."""
    _load(db_url, tmp_path)

    killed = _upgrade_process(db_url, BILLING_FAULT_KILL_IN_MIGRATION=revision)

    assert killed.returncode == -9, killed.stderr
    tables = _tables(db_url)
    assert "daily_charges" in tables  # rolled back
    assert "charge_periods" not in tables
    again = _upgrade_process(db_url)
    assert again.returncode == 0, again.stderr
    _assert_closed_months_unchanged(db_url)


STAMPED = datetime(2026, 6, 1, tzinfo=UTC).replace(tzinfo=None)  # naive UTC, as the jobs store it


def _daily_rows(seed: int) -> list[dict[str, Any]]:
    """Daily charges as the old version stored them, with what makes the forms' edges:
    runs cut by a month's first day, by a gap, by a change of amount (0, 1, 0 in one
    month) or of account; a cloud fee whose account goes A, B, A within a month, and
    months that start after their first day. Then random projects."""
    rng = random.Random(seed)
    run_ids = [f"run-{i:02d}" for i in range(4)]
    rows: list[dict[str, Any]] = []

    def add(project: str, kind: str, day: date, account: str, quantity: int, amount: int) -> None:
        rows.append(
            {
                "project_id": project,
                "charge_type": kind,
                "charge_date": day,
                "account_id": account,
                "quantity_units": quantity,
                "amount_units": amount,
                "run_id": rng.choice(run_ids),
                "recorded_at": STAMPED + timedelta(minutes=rng.randrange(10_000)),
            }
        )

    start = date(2026, 3, 28)
    for i in range(12):  # March 28 to April 8: a run cut by April 1st
        add("edge-month", "storage_fee", start + timedelta(days=i), "acc-a", 10_000, 10_000)
    for i, amount in enumerate([0, 0, 10_000, 10_000, 0, 0]):  # 0, 1, 0 in one month
        add("edge-amounts", "storage_fee", date(2026, 5, 3) + timedelta(days=i), "acc-a", 10_000, amount)
    for d in (3, 4, 6, 7):  # a gap on the 5th
        add("edge-gap", "storage_fee", date(2026, 5, d), "acc-a", 10_000, 10_000)
    for d, account in [(2, "acc-a"), (3, "acc-a"), (4, "acc-b"), (5, "acc-b"), (6, "acc-a"), (7, "acc-a")]:
        add("edge-accounts", "storage_fee", date(2026, 5, d), account, 10_000, 10_000)
        add("edge-accounts", "cloud_page_views", date(2026, 5, d), account, 1_000 * d, 10 * d)
    for d in (9, 10, 20, 31):  # a month form that starts on the 9th
        add("edge-accounts", "cloud_bandwidth", date(2026, 5, d), "acc-a", 5_000, 25_000 + d)
    kinds = ["storage_fee", "cloud_page_views", "cloud_bandwidth", "cloud_data_storage", "cloud_domains"]
    for p in range(40):
        account = f"acc-{p % 3}"
        for kind in rng.sample(kinds, rng.randint(1, 3)):
            for offset in sorted(rng.sample(range(75), rng.randint(1, 40))):  # March 20 to June 2
                if rng.random() < 0.05:
                    account = f"acc-{rng.randrange(3)}"
                quantity = 10_000 if kind == "storage_fee" else rng.randrange(0, 50_000)
                amount = rng.choice([0, 10_000]) if kind == "storage_fee" else rng.randrange(0, 9_000)
                day = date(2026, 3, 20) + timedelta(days=offset)
                add(f"prj-{p:02d}", kind, day, account, quantity, amount)
    return rows


@pytest.mark.parametrize(
    ("seed", "batch", "page"), [(1, charge_forms.DAYS_PER_BATCH, charge_forms.PROJECTS_PER_BATCH), (2, 37, 7)]
)
def test_the_upgrade_stores_the_canonical_form_of_any_daily_charges(
    db_url: str, seed: int, batch: int, page: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What 0012 and 0013 store is exactly `rules.periods`' canonical form of the daily
    charges (PostgreSQL in two statements, SQLite through pandas in batches of whole
    projects of about `batch` days, the projects counted `page` at a time), each period
    stamped with the latest time of its days and one of their runs; a downgrade gives
    back every day."""
    monkeypatch.setattr(charge_forms, "DAYS_PER_BATCH", batch)
    monkeypatch.setattr(charge_forms, "PROJECTS_PER_BATCH", page)
    rows = _daily_rows(seed)
    engine = make_engine(db_url)
    try:
        upgrade(engine, "0011")
        daily = sa.table("daily_charges", *[sa.column(c) for c in rows[0]])
        with engine.begin() as conn:
            conn.execute(daily.insert(), rows)
        upgrade(engine)
        with engine.connect() as conn:
            stored = _stored(conn)
        days = pd.DataFrame(rows).assign(day=lambda d: [day_number(x) for x in d["charge_date"]])
        expected = periods.from_days(days[periods.DAY_COLUMNS])
        key = periods.KEY
        got, want = (
            f[periods.COLUMNS].astype({"daily": object}).fillna({"daily": ""}).sort_values(key)
            for f in (stored, expected)
        )
        got, want = got.reset_index(drop=True), want.reset_index(drop=True)
        pd.testing.assert_frame_equal(got, want, check_dtype=False)
        assert ((got["daily"] == "") == (got["charge_type"] == "storage_fee")).all()
        # Each period's time is its days' latest, its run one of theirs.
        per_day = periods.to_days(stored[periods.COLUMNS]).merge(
            days[["project_id", "charge_type", "day", "run_id", "recorded_at"]],
            on=["project_id", "charge_type", "day"],
        )
        assert len(per_day) == len(rows)
        for period in stored.itertuples(index=False):
            mine = per_day[
                (per_day["project_id"] == period.project_id)
                & (per_day["charge_type"] == period.charge_type)
                & (per_day["day"] >= period.first_day)
                & (per_day["day"] <= period.last_day)
                & (per_day["account_id"] == period.account_id)
            ]
            assert pd.Timestamp(period.recorded_at) == mine["recorded_at"].max()
            assert period.run_id in set(mine["run_id"])

        key_of = ("project_id", "charge_type", "charge_date", "account_id", "quantity_units", "amount_units")
        # Down from the newest, and down from 0012 alone (which holds month forms on
        # PostgreSQL): every day comes back.
        for path in ["0012", "0011"]:
            downgrade(engine, "0011")
            with engine.connect() as conn:
                back = conn.execute(sa.select(daily)).all()
            assert sorted(tuple(str(r._mapping[c]) for c in key_of) for r in back) == sorted(
                tuple(str(r[c]) for c in key_of) for r in rows
            )
            upgrade(engine, path)
    finally:
        engine.dispose()


def _stored(conn: sa.Connection) -> pd.DataFrame:
    """charge_periods with days as day numbers, and each period's run and time."""
    columns = [*periods.COLUMNS, "run_id", "recorded_at"]
    found = conn.execute(sa.select(*[sa.column(c) for c in columns]).select_from(sa.table("charge_periods")))
    frame = pd.DataFrame(found.all(), columns=columns)
    for column in ("first_day", "last_day"):
        frame[column] = [day_number(_date(d)) for d in frame[column]]
    frame["recorded_at"] = pd.to_datetime(frame["recorded_at"])
    return frame


def _date(value: date | str) -> date:
    return value if isinstance(value, date) else date.fromisoformat(value)
