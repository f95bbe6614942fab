"""Stored charges are compared with the truth row by row, reads are per chunk, and
amounts out of range are rejected rows (both back ends, through the commands)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime

import pandas as pd
import pytest
import sqlalchemy as sa
import time_machine
from support import (
    SourceData,
    charge_days,
    day_of,
    export_rows,
    lines_by,
    reject_reasons,
    rewrite_charge_days,
    run_cli,
)

from billing_jobs.db.engine import make_engine
from billing_jobs.db.reads import plan_chunks
from billing_jobs.db.sql import Chunk, among
from billing_jobs.db.writes import bulk_insert
from billing_jobs.jobs.compute import compute_chunk
from billing_jobs.rules.calendar import Month
from billing_jobs.settings import load_settings


@pytest.fixture(autouse=True)
def clock() -> Iterator[None]:
    """June 2026, ticking: the runs of a test start at different instants."""
    with time_machine.travel(datetime(2026, 6, 1, 3, 0, tzinfo=UTC), tick=True):
        yield


def _charges(db_url: str) -> dict[tuple[str, str, str], tuple[int, int]]:
    """The stored charges, day by day."""
    return {(p, t, d): (q, m) for p, t, d, _, q, m in charge_days(db_url)}


def _owners(db_url: str) -> set[tuple[str, str]]:
    """The (project, account) pairs that charges are stored under."""
    return {(p, a) for p, _, _, a, _, _ in charge_days(db_url)}


def _set_amounts(db_url: str, changes: dict[tuple[str | None, str], int]) -> None:
    """Store other amounts on some days ((project or None for every project, ISO day) ->
    amount units), as an edit of the table by hand would."""

    def edit(days: pd.DataFrame) -> pd.DataFrame:
        days = days.copy()
        for (project, day), amount in changes.items():
            hit = days["day"] == day_of(day)
            if project is not None:
                hit &= days["project_id"] == project
            days.loc[hit, "amount_units"] = amount
        return days

    rewrite_charge_days(db_url, edit)


def _sql(db_url: str, *statements: str) -> None:
    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(sa.text(statement))
    finally:
        engine.dispose()


def _last_counts(db_url: str) -> dict[str, int]:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            text = conn.execute(
                sa.text("SELECT counts FROM billing_runs ORDER BY started_at DESC LIMIT 1")
            ).scalar()
    finally:
        engine.dispose()
    counts: dict[str, int] = json.loads(str(text))
    return counts


def test_stored_charges_that_keep_count_sum_and_day_weighted_sum_but_differ_are_corrected(
    db_url: str,
) -> None:
    """Days 1, 2, 3 moved by +0.25, -0.5, +0.25 credits: the same count, sum and
    day-weighted sum (1*0.25 - 2*0.5 + 3*0.25 = 0), different charges."""
    data = SourceData()
    data.project("p1", created="2025-11-02")
    data.project("p2", created="2025-11-02")
    data.write_url(db_url)
    assert run_cli(db_url, "month-end", "--month", "2026-05").code == 0
    truth = _charges(db_url)
    assert truth[("p1", "storage_fee", "2026-05-02")] == (10_000, 10_000)

    _set_amounts(
        db_url, {("p1", "2026-05-01"): 12500, ("p1", "2026-05-02"): 5000, ("p1", "2026-05-03"): 12500}
    )
    tampered = _charges(db_url)
    assert tampered != truth
    days = [(dom, tampered[("p1", "storage_fee", f"2026-05-0{dom}")][1]) for dom in (1, 2, 3)]
    assert sum(a for _, a in days) == 30_000  # as before
    assert sum(d * a for d, a in days) == 60_000  # as before

    assert run_cli(db_url, "month-end", "--month", "2026-05").code == 0

    assert _charges(db_url) == truth
    counts = _last_counts(db_url)
    # Stored as periods: days 1, 2, 3 and 4..29 (four), now one period 1..29 again.
    assert (counts["rows_deleted"], counts["rows_inserted"]) == (4, 1)
    assert counts["invoices"] == 0  # the invoices were right all along


def test_nightly_corrects_exactly_the_day_it_bills(db_url: str) -> None:
    data = SourceData()
    data.project("p1", created="2025-11-02")
    data.write_url(db_url)
    for day in ("2026-05-01", "2026-05-02", "2026-05-03"):
        assert run_cli(db_url, "nightly", "--date", day).code == 0
    truth = _charges(db_url)
    _set_amounts(db_url, {(None, "2026-05-01"): 12500, (None, "2026-05-02"): 5000})

    assert run_cli(db_url, "nightly", "--date", "2026-05-02").code == 0

    now = _charges(db_url)
    assert now[("p1", "storage_fee", "2026-05-02")] == truth[("p1", "storage_fee", "2026-05-02")]
    assert now[("p1", "storage_fee", "2026-05-01")] == (10_000, 12_500)  # another day: not this run's


def test_a_repeated_run_over_unchanged_data_deletes_and_inserts_nothing(db_url: str) -> None:
    data = SourceData()
    data.project("p1", created="2025-11-02")
    data.event("p1", "2026-05-02 00:00", "published")
    data.cloud("p1", "2026-05-03", "page_views", "1234")
    data.write_url(db_url)
    assert run_cli(db_url, "month-end", "--month", "2026-05").code == 0

    assert run_cli(db_url, "month-end", "--month", "2026-05").code == 0

    counts = _last_counts(db_url)
    assert counts["rows_deleted"] == counts["rows_inserted"] == counts["invoices"] == 0


def test_amounts_out_of_range_are_rejected_with_their_reason_on_both_back_ends(db_url: str) -> None:
    """Two compute rows of 5e14 credits on SQLite (of the largest NUMERIC(18,4) on
    PostgreSQL): together past the 64-bit range of units."""
    huge = "500000000000000" if db_url.startswith("sqlite") else "99999999999999.9999"
    data = SourceData()
    data.project("p1", created="2025-11-02")
    data.compute("p1", "2026-05-02 10:00", huge, usage_id="cu-huge-1")
    data.compute("p1", "2026-05-03 10:00", huge, usage_id="cu-huge-2")
    data.compute("p1", "2026-05-04 10:00", "-2000000000", usage_id="cu-huge-neg")
    data.compute("p1", "2026-05-05 10:00", "30", usage_id="cu-fine")
    data.event("p1", "2026-05-01 00:00", "published")
    data.cloud("p1", "2026-05-06", "bandwidth_gb", "1000000000.0001", usage_id="cl-huge")
    data.cloud("p1", "2026-05-06", "bandwidth_gb", "2", usage_id="cl-fine")
    data.write_url(db_url)

    result = run_cli(db_url, "month-end", "--month", "2026-05")

    assert result.code == 0, result.stderr
    totals = lines_by(export_rows(db_url, "2026-05"), "line_type")
    assert totals[("storage_refund",)] == -29  # the waiver from the one usable row of 30
    assert totals[("cloud_bandwidth",)] == 1
    found = {(row_id, reason) for _, row_id, reason in reject_reasons(db_url)}
    assert found == {
        ("cu-huge-1", "amount_out_of_range"),
        ("cu-huge-2", "amount_out_of_range"),
        ("cu-huge-neg", "amount_out_of_range"),
        ("cl-huge", "amount_out_of_range"),
    }


def test_a_chunk_reads_only_its_own_accounts_rows(db_url: str) -> None:
    """Memory is bounded by the chunk by construction: whatever else the database holds,
    every frame a chunk's computation reads holds the chunk's accounts' rows alone."""
    data = SourceData()
    for a in range(6):
        for p in range(2):
            pid = f"a{a}-p{p}"
            data.project(pid, created="2026-01-05", account=f"acct-{a}")
            data.event(pid, "2026-05-01 00:00", "published")
            data.cloud(pid, "2026-05-02", "page_views", "10")
            data.compute(pid, "2026-05-03 00:00", "1")
    data.write_url(db_url)
    settings = load_settings(None)
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            chunks = plan_chunks(conn, 4)
            assert [c.projects for c in chunks] == [4, 4, 4]
            month = Month(2026, 5)
            seen: set[str] = set()
            for chunk in chunks:
                assert chunk.accounts is not None
                mine = set(chunk.accounts)
                result = compute_chunk(conn, settings, month, chunk)
                assert result.compute is not None
                assert result.lines is not None
                projects = set(result.projects["project_id"])
                assert len(projects) == chunk.projects == 4
                assert set(result.projects["account_id"]) == mine
                for frame in (result.storage, result.cloud, result.charges, result.compute, result.lines):
                    assert set(frame["project_id"]) <= projects
                assert len(result.storage) <= 4 * month.days
                assert not seen & mine
                seen |= mine
            assert len(seen) == 6
    finally:
        engine.dispose()


AWKWARD_IDS = ["plain", 'say "hi"', "back\\slash", "a,b", "{braces}", "NULL", "", " lead", "Ärger", "end\\"]


@pytest.mark.parametrize(
    "named",
    [
        AWKWARD_IDS,
        AWKWARD_IDS[:1],
        [],
        ['"', "\\"],
        ["plain", "a,b", "{braces}", "NULL", "", " lead"],  # one array text on PostgreSQL
    ],
)
def test_a_chunk_names_exactly_its_accounts_whatever_their_ids_hold(db_url: str, named: list[str]) -> None:
    """Membership (`db.sql.among`) is equality with each named id, sent as one array:
    quotes, backslashes, commas, braces, the word NULL and the empty id are ids like any."""
    ids = [*AWKWARD_IDS, '"', "\\", "other", "null", "plain "]
    engine = make_engine(db_url)
    try:
        table = sa.Table("ids_named", sa.MetaData(), sa.Column("account_id", sa.String(64)))
        with engine.begin() as conn:
            table.create(conn)
            conn.execute(table.insert(), [{"account_id": i} for i in ids])
        with engine.connect() as conn:
            column = table.c.account_id
            for condition in (among(column, named), Chunk(tuple(named)).clause(column)):
                found = conn.execute(sa.select(table.c.account_id).where(condition)).scalars().all()
                assert sorted(found) == sorted(named)
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_postgresql_plans_a_chunks_ids_as_one_constant_list(pg_db_url: str) -> None:
    """The ids reach PostgreSQL's planner as a constant array, which it tests each row
    against by hash: an expression the planner cannot fold (a text cast to an array)
    makes it search the list row by row, and a chunk's compute read about forty times
    slower at 100k projects."""
    engine = make_engine(pg_db_url)
    table = sa.Table("chunk_ids", sa.MetaData(), sa.Column("account_id", sa.String))
    named = tuple(f"acct-{i:05d}" for i in range(200))
    try:
        with engine.begin() as conn:
            table.create(conn)
        with engine.connect() as conn:
            query = sa.select(table.c.account_id).where(Chunk(named).clause(table.c.account_id))
            compiled = query.compile(conn)
            plan = conn.exec_driver_sql(
                f"EXPLAIN (VERBOSE, FORMAT JSON) {compiled.string}", compiled.params
            ).scalar_one()
        text = str(plan)
        assert "acct-00199" in text  # the list is in the plan: a constant, not a parameter
        # A constant array shows as `= ANY ('{...}'::text[])`, an expression as `= ANY (((...`.
        assert "= ANY ('{" in text
    finally:
        engine.dispose()


def test_explain_on_a_month_in_progress_stops_at_yesterday(db_url: str) -> None:
    data = SourceData()
    data.project("p1", created="2025-11-02")
    data.write_url(db_url)

    with time_machine.travel(datetime(2026, 6, 11, 9, 0, tzinfo=UTC), tick=False):
        result = run_cli(db_url, "explain", "--project", "p1", "--month", "2026-06", "--json")

    assert result.code == 0, result.stderr
    record = json.loads(result.stdout)
    assert [d["date"] for d in record["days"]] == [f"2026-06-{d:02d}" for d in range(1, 11)]
    storage = [t for t in record["totals"] if t["line_type"] == "storage_fee"]
    assert [(t["quantity"], t["amount"]) for t in storage] == [("10", "10")]


@pytest.mark.parametrize(("source", "target"), [("acct-a", "acct-b"), ("acct-b", "acct-a")])
def test_a_project_moved_to_an_account_in_another_chunk_has_its_charges_moved_with_it(
    db_url: str, source: str, target: str
) -> None:
    """Whichever chunk runs first (the one it left or the one it joined)."""
    data = SourceData()
    data.project("p-moved", created="2025-11-02", account=source)
    data.project("p-stays", created="2025-11-02", account=target)
    data.write_url(db_url)
    chunks = ("--projects-per-chunk", "1", "--workers", "1")
    assert run_cli(db_url, "month-end", "--month", "2026-05", *chunks).code == 0
    _sql(db_url, f"UPDATE projects SET account_id = '{target}' WHERE project_id = 'p-moved'")

    result = run_cli(db_url, "month-end", "--month", "2026-05", *chunks)

    assert result.code == 0, result.stderr
    owners = _owners(db_url)
    assert owners == {("p-moved", target), ("p-stays", target)}
    totals = lines_by(export_rows(db_url, "2026-05"), "account_id", "project_id")
    assert totals[(source, "p-moved")] == 0  # invoiced, then adjusted away
    assert totals[(target, "p-moved")] == 29


def test_a_project_moved_to_an_account_with_nothing_billed_yet_has_its_charges_moved_with_it(
    db_url: str,
) -> None:
    """The new account's chunk comes first and has nothing stored of its own: it finds
    the old account's periods of the project it now holds, which are replaced, not doubled."""
    data = SourceData()
    data.project("p-moved", created="2025-11-02", account="acct-old")
    data.project("p-other", created="2025-11-02", account="acct-zzz")
    data.account("acct-0new")
    data.write_url(db_url)
    chunks = ("--projects-per-chunk", "1", "--workers", "1")
    assert run_cli(db_url, "month-end", "--month", "2026-05", *chunks).code == 0
    _sql(db_url, "UPDATE projects SET account_id = 'acct-0new' WHERE project_id = 'p-moved'")

    result = run_cli(db_url, "month-end", "--month", "2026-05", *chunks)

    assert result.code == 0, result.stderr
    charges = _charges(db_url)
    assert len(charges) == 2 * 29
    owners = _owners(db_url)
    assert owners == {("p-moved", "acct-0new"), ("p-other", "acct-zzz")}
    totals = lines_by(export_rows(db_url, "2026-05"), "account_id", "project_id")
    assert totals[("acct-old", "p-moved")] == 0
    assert totals[("acct-0new", "p-moved")] == 29
    assert run_cli(db_url, "month-end", "--month", "2026-05", *chunks).code == 0
    assert _charges(db_url) == charges


@pytest.mark.parametrize(("source", "target"), [("acct-a", "acct-b"), ("acct-b", "acct-a")])
def test_a_project_moved_mid_month_ends_the_month_under_its_new_account_alone(
    db_url: str, source: str, target: str
) -> None:
    """Nights before and after the move, then the month-end: the night after the move
    takes the days it decides from the old account; the month-end, where the new
    account already holds periods of the project, leaves none of its days under the old
    one, and stores what a month-end alone stores on a fresh database."""
    data = SourceData()
    data.project("p-moved", created="2025-11-02", account=source)
    data.project("p-stays", created="2025-11-02", account=target)
    data.write_url(db_url)
    chunks = ("--projects-per-chunk", "1", "--workers", "1")
    with time_machine.travel(datetime(2026, 7, 2, 9, 0, tzinfo=UTC), tick=False):
        assert run_cli(db_url, "nightly", "--date", "2026-06-10", *chunks).code == 0
        _sql(db_url, f"UPDATE projects SET account_id = '{target}' WHERE project_id = 'p-moved'")
        assert run_cli(db_url, "nightly", "--date", "2026-06-15", *chunks).code == 0
        assert ("p-moved", source) in _owners(db_url)  # days before June 15 still under the old account

        result = run_cli(db_url, "month-end", "--month", "2026-06", *chunks)

    assert result.code == 0, result.stderr
    assert _owners(db_url) == {("p-moved", target), ("p-stays", target)}
    charges = _charges(db_url)
    assert len(charges) == 2 * 29
    totals = lines_by(export_rows(db_url, "2026-06"), "account_id", "project_id")
    assert (source, "p-moved") not in totals
    assert totals[(target, "p-moved")] == 29
    _sql(db_url, "DELETE FROM charge_periods")
    with time_machine.travel(datetime(2026, 7, 2, 9, 0, tzinfo=UTC), tick=False):
        assert run_cli(db_url, "month-end", "--month", "2026-06", *chunks).code == 0
    assert _charges(db_url) == charges


def test_bulk_insert_keeps_tabs_newlines_and_backslashes_in_text_exactly(db_url: str) -> None:
    """COPY's text format escapes them (PostgreSQL); a column without any is sent as it is."""
    table = sa.Table(
        "copy_probe",
        sa.MetaData(),
        sa.Column("k", sa.Integer, primary_key=True),
        sa.Column("plain", sa.String(32)),
        sa.Column("odd", sa.Text),
    )
    odd = ["a\tb", "line\nnext", "back\\slash\\N", "cr\r", None, "plain", "\\"]
    frame = pd.DataFrame(
        {"k": list(range(len(odd))), "plain": [f"p-{i}" for i in range(len(odd))], "odd": odd}
    )
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            table.create(conn)
            assert bulk_insert(conn, table, frame) == len(frame)
            got = conn.execute(sa.select(table.c.k, table.c.plain, table.c.odd).order_by(table.c.k)).all()
    finally:
        engine.dispose()
    assert [tuple(r) for r in got] == [(i, f"p-{i}", v) for i, v in enumerate(odd)]
