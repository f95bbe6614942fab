"""`billing-jobs rejects`: list, resolve, and the runs that close and reopen rejects.

Every test runs on SQLite and PostgreSQL (`db_url`), through the command line, with
the clock frozen. A bad row is "fixed" as another system would: with SQL on the
source table.
"""

from __future__ import annotations

import csv
import getpass
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
import time_machine
from support import SourceData, ok, run_cli, run_sql

from billing_jobs.db.engine import make_engine, upgrade
from billing_jobs.db.reads import shard_of
from billing_jobs.rules.rejects import reject_id

NOW = datetime(2026, 6, 10, 12, 0, tzinfo=UTC)
LEGACY = "2025-11-02"


@pytest.fixture(autouse=True)
def frozen_clock() -> Iterator[None]:
    with time_machine.travel(NOW, tick=False):
        yield


def summary_of(db_url: str, *args: str) -> dict[str, Any]:
    result = run_cli(db_url, *args)
    assert result.code == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]
    (summary,) = [e for e in events if e["event"] == "run.summary"]
    return summary


def listed(db_url: str, *filters: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in ok(db_url, "rejects", "--json", *filters).splitlines()]


def by_source(db_url: str) -> dict[str, dict[str, Any]]:
    return {r["source_id"]: r for r in listed(db_url, "--status", "all")}


def run_ids(db_url: str) -> set[str]:
    lines = ok(db_url, "runs", "--json", "--limit", "1000").splitlines()
    return {json.loads(line)["run_id"] for line in lines}


def run_job(db_url: str, *args: str) -> tuple[dict[str, Any], str]:
    """Run a job: its summary and its run id."""
    before = run_ids(db_url)
    summary = summary_of(db_url, *args)
    (new,) = run_ids(db_url) - before
    return summary, new


# ---------------------------------------------------------------------------
# Listing
# ---------------------------------------------------------------------------


def listing_data() -> SourceData:
    data = SourceData().project("p1", created=LEGACY)
    for usage_id in ("cu-a", "cu-Z", "cu-B"):  # code-point order: B, Z, a
        data.compute("p1", "2026-05-03 10:00", None, usage_id=usage_id)
    data.compute("ghost", "2026-05-04 10:00", "1", usage_id="cu-ghost")
    data.cloud("p1", "2026-04-02", "page_views", "100", usage_id="cl-april")  # not published
    return data


EXPECTED_ORDER = [
    ("2026-04", "cloud_usage", "cl-april", "not_published_that_day"),
    ("2026-05", "compute_usage", "cu-B", "missing_amount"),
    ("2026-05", "compute_usage", "cu-Z", "missing_amount"),
    ("2026-05", "compute_usage", "cu-a", "missing_amount"),
    ("2026-05", "compute_usage", "cu-ghost", "unknown_project"),
]


def test_rejects_are_listed_in_code_point_order_with_ids_and_filters(db_url: str) -> None:
    listing_data().write_url(db_url)
    ok(db_url, "month-end", "--month", "2026-04")
    ok(db_url, "month-end", "--month", "2026-05")

    rows = listed(db_url)
    assert [(r["period"], r["source_table"], r["source_id"], r["reason"]) for r in rows] == EXPECTED_ORDER
    for r in rows:
        assert r["reject_id"] == reject_id(r["source_table"], r["source_id"], r["reason"])
        assert r["status"] == "open"
        assert r["first_seen_at"] == "2026-06-10 12:00:00"
    assert rows[-1]["project_id"] == "ghost"
    assert rows[1]["detail"] == "occurred_at=2026-05-03 10:00:00 credits=NULL"
    assert len({r["reject_id"] for r in rows}) == len(rows)

    def sources(*filters: str) -> list[str]:
        return [r["source_id"] for r in listed(db_url, *filters)]

    assert sources("--month", "2026-04") == ["cl-april"]
    assert sources("--table", "compute_usage") == ["cu-B", "cu-Z", "cu-a", "cu-ghost"]
    assert sources("--reason", "unknown_project") == ["cu-ghost"]
    assert sources("--month", "2026-05", "--reason", "missing_amount") == ["cu-B", "cu-Z", "cu-a"]
    assert sources("--status", "resolved") == []
    assert sources("--status", "closed") == []
    assert sources("--status", "all") == [r[2] for r in EXPECTED_ORDER]

    table = ok(db_url, "rejects", "--month", "2026-05")
    assert "4 reject(s) (open)" in table
    assert reject_id("compute_usage", "cu-ghost", "unknown_project") in table

    text = ok(db_url, "rejects", "--csv")
    assert text.splitlines()[0] == (
        "reject_id,source_table,source_id,reason,project_id,period,detail,"
        "first_seen_at,status,resolved_at,resolved_by,resolution"
    )
    assert list(csv.DictReader(io.StringIO(text))) == [
        {k: "" if v is None else v for k, v in r.items()} for r in rows
    ]
    assert rows[0]["resolved_at"] is None


def test_bad_listing_arguments_are_usage_errors(db_url: str) -> None:
    listing_data().write_url(db_url)
    ok(db_url, "month-end", "--month", "2026-05")
    for args in (
        ("rejects", "--month", "2026-13"),
        ("rejects", "--status", "reviewed"),
        ("rejects", "--csv", "--json"),
    ):
        result = run_cli(db_url, *args)
        assert result.code == 2, args
        assert len(result.stderr.strip().splitlines()) == 1


def test_listing_a_database_without_the_jobs_tables_says_so_and_exits_1(db_url: str) -> None:
    result = run_cli(db_url, "rejects")
    assert result.code == 1
    assert "billing-jobs db upgrade" in result.stderr


# ---------------------------------------------------------------------------
# Resolving
# ---------------------------------------------------------------------------


def test_resolve_records_who_when_and_the_note_and_keeps_the_first_resolution(db_url: str) -> None:
    listing_data().write_url(db_url)
    ok(db_url, "month-end", "--month", "2026-05")
    ghost = reject_id("compute_usage", "cu-ghost", "unknown_project")
    b = reject_id("compute_usage", "cu-B", "missing_amount")

    # Typed in lower case with a dash: the same id.
    typed = ghost.lower()[:6] + "-" + ghost.lower()[6:]
    out = ok(db_url, "rejects", "resolve", typed, "--note", "test project, deleted", "--by", "alice")
    assert out == f"resolved {ghost} (compute_usage cu-ghost unknown_project)\n"
    row = by_source(db_url)["cu-ghost"]
    assert (row["status"], row["resolved_by"], row["resolved_at"], row["resolution"]) == (
        "resolved",
        "alice",
        "2026-06-10 12:00:00",
        "test project, deleted",
    )
    assert [r["source_id"] for r in listed(db_url, "--status", "resolved")] == ["cu-ghost"]
    assert "cu-ghost" not in [r["source_id"] for r in listed(db_url)]

    # Again, by someone else, with the one still open: the first resolution is kept.
    with time_machine.travel(datetime(2026, 6, 11, 9, 0, tzinfo=UTC), tick=False):
        out = ok(db_url, "rejects", "resolve", ghost, b, "--note", "again", "--by", "bob")
    assert f"resolved {b} (compute_usage cu-B missing_amount)" in out
    assert f"already resolved {ghost}, kept: 2026-06-10 12:00:00 UTC by alice: test project, deleted" in out
    rows = by_source(db_url)
    ghost_row = rows["cu-ghost"]
    assert (ghost_row["resolved_by"], ghost_row["resolution"]) == ("alice", "test project, deleted")
    assert (rows["cu-B"]["resolved_by"], rows["cu-B"]["resolved_at"]) == ("bob", "2026-06-11 09:00:00")

    # Without --by: the operating system user.
    z = reject_id("compute_usage", "cu-Z", "missing_amount")
    ok(db_url, "rejects", "resolve", z, "--note", "known")
    assert by_source(db_url)["cu-Z"]["resolved_by"] == getpass.getuser()

    # status counts open rejects only, and every status in --json.
    doc = json.loads(run_cli(db_url, "status", "--json").stdout)
    assert doc["open_rejects"]["total"] == 1
    assert doc["rejects_by_status"] == {"open": 1, "resolved": 3, "closed": 0}


def test_unknown_ids_exit_2_naming_them_and_nothing_changes(db_url: str) -> None:
    listing_data().write_url(db_url)
    ok(db_url, "month-end", "--month", "2026-05")
    known = reject_id("compute_usage", "cu-a", "missing_amount")
    before = by_source(db_url)
    result = run_cli(db_url, "rejects", "resolve", known, "NOSUCHID2345", "XYZ", "--note", "n")
    assert result.code == 2
    assert "unknown reject id(s): NOSUCHID2345, XYZ" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert by_source(db_url) == before
    for args in (("rejects", "resolve", known), ("rejects", "resolve", known, "--note", "  ")):
        assert run_cli(db_url, *args).code == 2
    assert by_source(db_url) == before


# ---------------------------------------------------------------------------
# Runs close what they no longer find, and reopen what comes back
# ---------------------------------------------------------------------------


def workflow_data() -> SourceData:
    data = SourceData().project("p1", created=LEGACY)
    data.event("p1", "2026-06-06 10:00", "restored", event_id="ev-bad")  # not allowed: active
    data.compute("p1", "2026-05-03 10:00", None, usage_id="cu-bad")
    data.cloud("p1", "2026-05-02", "page_views", "10", usage_id="cl-bad")  # not published
    data.compute("p1", "2026-04-03 10:00", None, usage_id="cu-april")
    data.top_up("T-bad", "2026-05-02 09:00", "online", credits="100", amount="-5")  # invalid amount
    return data


def test_a_fixed_row_is_closed_by_the_run_that_re_examines_it_and_reopened_when_it_comes_back(
    db_url: str,
) -> None:
    workflow_data().write_url(db_url)
    ok(db_url, "month-end", "--month", "2026-04")
    ok(db_url, "month-end", "--month", "2026-05")
    ok(db_url, "nightly", "--date", "2026-06-06")  # June is open: its days are billed nightly
    assert {r["source_id"]: r["status"] for r in listed(db_url, "--status", "all")} == {
        "cu-april": "open",
        "cl-bad": "open",
        "cu-bad": "open",
        "ev-bad": "open",
        "T-bad": "open",
    }
    assert "; rejected: 1" in ok(db_url, "credits", "exceptions", "--month", "2026-05")
    cl_bad = reject_id("cloud_usage", "cl-bad", "not_published_that_day")
    ok(db_url, "rejects", "resolve", cl_bad, "--note", "promo traffic", "--by", "carol")
    run_sql(
        db_url,
        "UPDATE compute_usage SET credits = 1 WHERE usage_id IN ('cu-bad', 'cu-april')",
        "DELETE FROM cloud_usage WHERE usage_id = 'cl-bad'",
        "DELETE FROM project_events WHERE event_id = 'ev-bad'",
        "UPDATE top_ups SET amount_paid = 9.5 WHERE top_up_id = 'T-bad'",
    )

    # A nightly of another day re-examines every event of its month, but not usage rows.
    summary, nightly_run = run_job(db_url, "nightly", "--date", "2026-06-08")
    assert summary["rejects_closed"] == 1
    rows = by_source(db_url)
    assert {k: r["status"] for k, r in rows.items()} == {
        "cu-april": "open",
        "cl-bad": "resolved",
        "cu-bad": "open",
        "ev-bad": "closed",
        "T-bad": "open",
    }
    assert rows["ev-bad"]["resolution"] == f"no longer found by nightly run {nightly_run} (2026-06: events)"
    event = rows["ev-bad"]
    assert (event["resolved_by"], event["resolved_at"]) == ("nightly", "2026-06-10 12:00:00")

    # A dry run changes nothing.
    ok(db_url, "month-end", "--month", "2026-05", "--dry-run")
    assert by_source(db_url) == rows

    # The month re-closed: its usage and top-ups are re-examined; April's are not.
    summary, close_run = run_job(db_url, "month-end", "--month", "2026-05")
    assert summary["rejects_closed"] == 2  # cu-bad (month-end), T-bad (credits ledger)
    rows = by_source(db_url)
    assert {k: r["status"] for k, r in rows.items()} == {
        "cu-april": "open",
        "cl-bad": "resolved",  # a person's resolution stays
        "cu-bad": "closed",
        "ev-bad": "closed",
        "T-bad": "closed",
    }
    closed_by_month_end = f"no longer found by month-end run {close_run} (2026-05: whole month)"
    assert rows["cu-bad"]["resolution"] == closed_by_month_end
    assert rows["cu-bad"]["resolved_by"] == "month-end"
    assert rows["T-bad"]["resolution"] == (
        f"no longer found by credits ledger run {close_run} (2026-05: top-ups and refund requests)"
    )
    assert rows["cl-bad"]["resolution"] == "promo traffic"
    assert [r["source_id"] for r in listed(db_url)] == ["cu-april"]
    assert "; rejected: 0" in ok(db_url, "credits", "exceptions", "--month", "2026-05")

    # A repeat changes nothing.
    summary = summary_of(db_url, "month-end", "--month", "2026-05")
    assert summary["rejects_closed"] == 0
    assert by_source(db_url) == rows

    # The row goes bad again: open again, saying so.
    run_sql(db_url, "UPDATE compute_usage SET credits = NULL WHERE usage_id = 'cu-bad'")
    _, reopen_run = run_job(db_url, "month-end", "--month", "2026-05")
    row = by_source(db_url)["cu-bad"]
    assert row["status"] == "open"
    assert (row["resolved_by"], row["resolved_at"]) == (None, None)
    assert row["resolution"] == (
        f"reopened: found again by run {reopen_run} at 2026-06-10 12:00:00 UTC; was closed: "
        + closed_by_month_end
    )
    assert by_source(db_url)["ev-bad"]["status"] == "closed"
    again = by_source(db_url)
    ok(db_url, "month-end", "--month", "2026-05")
    assert by_source(db_url) == again
    doc = json.loads(run_cli(db_url, "status", "--json").stdout)
    assert doc["rejects_by_status"] == {"open": 2, "resolved": 1, "closed": 2}
    assert doc["open_rejects"]["total"] == 2


def test_a_shard_closes_the_rejects_of_its_own_accounts_and_of_unknown_projects(db_url: str) -> None:
    names = [f"acct-{i}" for i in range(20)]
    a = next(n for n in names if shard_of(n, 2) == 0)
    b = next(n for n in names if shard_of(n, 2) == 1)
    data = SourceData().project("pa", created=LEGACY, account=a).project("pb", created=LEGACY, account=b)
    data.compute("pa", "2026-05-03 10:00", None, usage_id="cu-a")
    data.compute("pb", "2026-05-03 10:00", None, usage_id="cu-b")
    data.compute("ghost", "2026-05-03 10:00", "1", usage_id="cu-ghost")
    data.write_url(db_url)
    ok(db_url, "month-end", "--month", "2026-05")
    run_sql(
        db_url,
        "UPDATE compute_usage SET credits = 1 WHERE usage_id IN ('cu-a', 'cu-b')",
        "DELETE FROM compute_usage WHERE usage_id = 'cu-ghost'",
    )
    ok(db_url, "month-end", "--month", "2026-05", "--shard", "0/2")
    status = {k: r["status"] for k, r in by_source(db_url).items()}
    assert status == {"cu-a": "closed", "cu-b": "open", "cu-ghost": "closed"}
    assert by_source(db_url)["cu-a"]["resolution"].endswith("(2026-05: accounts of shard 0/2)")
    ok(db_url, "month-end", "--month", "2026-05", "--shard", "1/2")
    assert by_source(db_url)["cu-b"]["status"] == "closed"


def test_rejects_found_on_worker_processes_are_not_closed(db_url: str) -> None:
    data = SourceData()
    for p in ("pa", "pb", "pc"):
        data.project(p, created=LEGACY, account=f"acct-{p}")
        data.event(p, "2026-05-06 10:00", "restored", event_id=f"ev-{p}")  # not allowed: active
    data.write_url(db_url)
    parallel = ("month-end", "--month", "2026-05", "--workers", "2", "--projects-per-chunk", "1")
    ok(db_url, *parallel)
    assert {k: r["status"] for k, r in by_source(db_url).items()} == {
        "ev-pa": "open",
        "ev-pb": "open",
        "ev-pc": "open",
    }
    run_sql(db_url, "DELETE FROM project_events WHERE event_id = 'ev-pb'")
    summary, _ = run_job(db_url, *parallel)
    assert summary["rejects_closed"] == 1
    assert {k: r["status"] for k, r in by_source(db_url).items()} == {
        "ev-pa": "open",
        "ev-pb": "closed",
        "ev-pc": "open",
    }


# ---------------------------------------------------------------------------
# The migration and the help
# ---------------------------------------------------------------------------


def test_the_migration_gives_recorded_rejects_their_ids_and_resolves_reviewed_ones(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine, "0005")
        with engine.begin() as conn:
            for source_id, status in (("cu-1", "open"), ("cu-2", "reviewed")):
                conn.execute(
                    sa.text(
                        "INSERT INTO rejects (source_table, source_id, reason, project_id, period, detail,"
                        " first_run_id, first_seen_at, status) VALUES ('compute_usage', :s, 'missing_amount',"
                        " 'p1', '2026-05', 'd', 'r1', '2026-06-01 00:00:00', :status)"
                    ),
                    {"s": source_id, "status": status},
                )
        upgrade(engine)
    finally:
        engine.dispose()
    rows = by_source(db_url)
    assert rows["cu-1"]["reject_id"] == reject_id("compute_usage", "cu-1", "missing_amount")
    assert rows["cu-2"]["reject_id"] == reject_id("compute_usage", "cu-2", "missing_amount")
    assert (rows["cu-1"]["status"], rows["cu-2"]["status"]) == ("open", "resolved")


@pytest.mark.parametrize("args", [("rejects",), ("rejects", "resolve")])
def test_rejects_commands_have_help_text(args: tuple[str, ...]) -> None:
    result = run_cli(None, *args, "--help")
    assert result.code == 0
    assert "Example" in result.stdout
