"""The chunk reads of the source tables, checked row for row on both back ends.

`read_cloud_usage` brings back one row per project and metric (the rows' days and
quantities as one text) and sums the rows of a day in numpy; the reject scans find
unknown projects through each distinct project id. Both must give what a plain
per-row reading of the rules gives.
"""

from __future__ import annotations

from collections import Counter
from datetime import date
from itertools import pairwise
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing_jobs.db import reads
from billing_jobs.db.credit_reads import read_compute_days, read_compute_per_day
from billing_jobs.db.engine import make_engine
from billing_jobs.db.reads import KEY_SHIFT, KEYS, MAX_AMOUNT, pairs_of, summed_pairs
from billing_jobs.db.sql import Chunk
from billing_jobs.frames import pd
from billing_jobs.jobs.compute import REJECT_COLUMNS, SourceTally, source_rejects
from billing_jobs.jobs.ledger import KnownCompute, compute_per_day
from billing_jobs.rules.calendar import local_midnight_utc
from billing_jobs.settings import Settings
from tests.support import SourceData, day_of, ts


def _data() -> SourceData:
    data = SourceData()
    data.account("acct-1").account("acct-2")
    data.project("p1", created="2026-01-02", account="acct-1")
    data.project("p2", created="2026-01-02", account="acct-1")
    data.project("q1", created="2026-01-02", account="acct-2")
    # p1: three rows on May 3 (summed exactly), one on May 4, one on May 31, one in June.
    for quantity in ("0.1", "0.2", "0.0001"):
        data.cloud("p1", "2026-05-03", "page_views", quantity)
    data.cloud("p1", "2026-05-04", "page_views", "7")
    data.cloud("p1", "2026-05-31", "page_views", "1.5")
    data.cloud("p1", "2026-06-01", "page_views", "100")
    data.cloud("p1", "2026-05-03", "bandwidth_gb", "2.25")
    # Metrics interleaved day by day, and a day out of the index's order by metric.
    data.cloud("p2", "2026-05-02", "domains", "1")
    data.cloud("p2", "2026-05-01", "bandwidth_gb", "0.5")
    data.cloud("p2", "2026-05-02", "page_views", "3")
    data.cloud("p2", "2026-05-01", "domains", "2")
    data.cloud("p2", "2026-05-02", "domains", "4")
    # Not usable: each is a reject, never a quantity.
    data.cloud("p1", "2026-05-05", "page_views", "-1", usage_id="bad-negative")
    data.cloud("p1", "2026-05-05", "page_views", None, usage_id="bad-missing")
    data.cloud("p2", "2026-05-05", "no_such_metric", "1", usage_id="bad-metric")
    data.cloud("ghost", "2026-05-06", "page_views", "3", usage_id="bad-ghost")
    data.cloud("ghost", "2026-05-07", "page_views", None, usage_id="bad-ghost-missing")
    # Another account's project: not in acct-1's chunk.
    data.cloud("q1", "2026-05-03", "page_views", "9")
    data.compute("p1", "2026-05-03 10:00", "0.1", count=3)
    data.compute("ghost", "2026-05-03 10:00", "1", usage_id="bad-compute-ghost")
    data.compute("p2", "2026-05-03 11:00", None, usage_id="bad-compute-missing")
    return data


def test_cloud_usage_is_summed_per_project_metric_and_day_for_the_chunk_alone(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        _data().write(engine)
        with engine.connect() as conn:
            usage = reads.read_cloud_usage(conn, date(2026, 5, 1), date(2026, 5, 31), Chunk(("acct-1",)))
            empty = reads.read_cloud_usage(conn, date(2026, 5, 1), date(2026, 5, 31), Chunk(("acct-9",)))
        got = sorted(
            (p, int(d), m, int(q))
            for p, d, m, q in usage[["project_id", "day", "metric", "quantity_units"]].itertuples(index=False)
        )
        assert got == [
            ("p1", day_of("2026-05-03"), "bandwidth_gb", 22_500),
            ("p1", day_of("2026-05-03"), "page_views", 3_001),
            ("p1", day_of("2026-05-04"), "page_views", 70_000),
            ("p1", day_of("2026-05-31"), "page_views", 15_000),
            ("p2", day_of("2026-05-01"), "bandwidth_gb", 5_000),
            ("p2", day_of("2026-05-01"), "domains", 20_000),
            ("p2", day_of("2026-05-02"), "domains", 50_000),
            ("p2", day_of("2026-05-02"), "page_views", 30_000),
        ]
        # Each (project, metric)'s days come together and in day order.
        keys = list(zip(usage["project_id"], usage["metric"], usage["day"], strict=True))
        runs = [k[:2] for i, k in enumerate(keys) if i == 0 or k[:2] != keys[i - 1][:2]]
        assert len(runs) == len(set(runs))
        assert all(a < b for a, b in pairwise(keys) if a[:2] == b[:2])
        assert empty.empty
        assert list(empty.columns) == ["project_id", "day", "metric", "quantity_units"]
    finally:
        engine.dispose()


MAX_UNITS = MAX_AMOUNT * 10_000  # the largest units a usable row holds, either sign
ROWS = st.lists(st.tuples(st.integers(0, 3), st.integers(0, KEYS - 1), st.integers(-MAX_UNITS, MAX_UNITS)))


def _packed(rows: list[tuple[int, int, int]], group: int) -> bytes:
    """A group's rows as PostgreSQL's `day_pairs` sends them: key * 2**52 + value, 8 bytes each."""
    return b"".join(((k << KEY_SHIFT) + v).to_bytes(8, "big", signed=True) for g, k, v in rows if g == group)


@settings(max_examples=200, deadline=None)
@given(ROWS.filter(len), st.booleans())
def test_summed_pairs_sum_each_groups_rows_per_key_whatever_their_order(
    rows: list[tuple[int, int, int]], as_bytes: bool
) -> None:
    """Rows of (group, key, value), in any order within their group, as each group's
    bytes (PostgreSQL) or text of `key value` pairs (SQLite): every key and value read
    back exactly, at the ends of their ranges too, and summed per group and key."""
    rows = sorted(rows, key=lambda r: r[0])  # the groups come in order; their rows need not
    present = sorted({r[0] for r in rows})  # a group read has one row at least
    counts = np.array([sum(r[0] == g for r in rows) for g in present], dtype=np.int64)
    values = (
        [_packed(rows, g) for g in present]
        if as_bytes
        else [" ".join(f"{k} {v}" for r, k, v in rows if r == g) for g in present]
    )
    key, value = pairs_of(values, len(rows))
    assert list(zip(key.tolist(), value.tolist(), strict=True)) == [(k, v) for _, k, v in rows]
    group, keys, sums = summed_pairs(counts, key, value)
    expected: Counter[tuple[int, int]] = Counter()
    for g, k, v in rows:
        expected[(present.index(g), k)] += v
    got = [(int(g), int(k)) for g, k in zip(group, keys, strict=True)]
    assert got == sorted(expected)
    assert dict(zip(got, sums.tolist(), strict=True)) == dict(expected)


def test_day_pairs_read_back_refuses_a_group_that_does_not_hold_its_rows() -> None:
    with pytest.raises(AssertionError, match="day pairs"):
        pairs_of([_packed([(0, 1, 5)], 0)], 2)
    with pytest.raises(AssertionError, match="day pairs"):
        pairs_of(["1 5 2"], 1)


def test_the_reject_scans_name_every_bad_row_once_with_its_reason(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        _data().write(engine)
        with engine.connect() as conn:
            cloud = reads.read_cloud_rejects(conn, date(2026, 5, 1), date(2026, 5, 31))
            compute = reads.read_compute_rejects(conn, ts("2026-05-01 00:00"), ts("2026-06-01 00:00"))
        assert sorted(zip(cloud["usage_id"], cloud["reason"], strict=True)) == [
            ("bad-ghost", "unknown_project"),
            ("bad-ghost-missing", "unknown_project"),
            ("bad-metric", "unknown_metric"),
            ("bad-missing", "missing_amount"),
            ("bad-negative", "negative_quantity"),
        ]
        assert sorted(zip(compute["usage_id"], compute["reason"], strict=True)) == [
            ("bad-compute-ghost", "unknown_project"),
            ("bad-compute-missing", "missing_amount"),
        ]
    finally:
        engine.dispose()


@pytest.mark.parametrize("ghosts", [True, False], ids=["unknown-projects", "known-projects-only"])
def test_rejects_found_from_the_chunks_tally_are_those_the_month_scans_find(
    db_url: str, ghosts: bool
) -> None:
    """A month-end's chunks count every usage row they read and name the projects with
    bad rows (`SourceTally`); after them, the month's rejects are found from that: the
    rows of the projects named, and rows of unknown projects only when the month holds
    more rows than the chunks read. Both give what the two scans of the month give."""
    settings = Settings()
    zone = ZoneInfo(settings.timezone)
    data = _data()
    if not ghosts:
        data = SourceData()
        data.account("acct-1").account("acct-2")
        data.project("p1", created="2026-01-02", account="acct-1")
        data.project("q1", created="2026-01-02", account="acct-2")
        data.cloud("p1", "2026-05-03", "page_views", "2")
        data.cloud("p1", "2026-05-05", "page_views", "-1", usage_id="bad-negative")
        data.cloud("q1", "2026-05-05", "page_views", "2000000000", usage_id="bad-huge")
        data.cloud("q1", "2026-04-30", "page_views", None, usage_id="april")
        data.compute("p1", "2026-05-03 10:00", "0.1", count=3)
        data.compute("q1", "2026-05-09 10:00", None, usage_id="bad-compute-missing")
    engine = make_engine(db_url)
    try:
        data.write(engine)
        first, last = date(2026, 5, 1), date(2026, 5, 31)
        with engine.connect() as conn:
            tally = SourceTally()
            for chunk in (Chunk(("acct-1",)), Chunk(("acct-2",))):
                cloud = reads.read_cloud_tallied(conn, first, last, chunk)
                compute = read_compute_days(conn, first, last, zone, chunk)
                tally += SourceTally(compute.seen, cloud.seen, compute.unusable, cloud.unusable)
            start, end = local_midnight_utc(first, zone), local_midnight_utc(date(2026, 6, 1), zone)
            rows = reads.usage_rows(conn, start, end, first, last)
            scanned = source_rejects(conn, settings, first, last)
            tallied = source_rejects(conn, settings, first, last, tally)
        if ghosts:
            assert rows == (tally.compute + 1, tally.cloud + 2)  # the ghost's rows
            assert sorted(tally.cloud_unusable) == ["p1", "p2"]
            assert tally.compute_unusable == ("p2",)
        else:
            assert rows == (tally.compute, tally.cloud) == (4, 3)
            assert sorted(tally.cloud_unusable) == ["p1", "q1"]
            assert tally.compute_unusable == ("q1",)
        assert len(scanned) == (7 if ghosts else 3)

        def ordered(frame: pd.DataFrame) -> list[tuple[object, ...]]:
            return sorted(frame[list(REJECT_COLUMNS)].itertuples(index=False, name=None))

        assert ordered(tallied) == ordered(scanned)
    finally:
        engine.dispose()


def test_compute_days_give_the_ledger_its_compute_per_account_and_day_across_a_dst_change(
    db_url: str,
) -> None:
    """The month-end chunk's one read of compute (per project and billing day) sums, per
    account and day, to what the ledger's own read gives, on a month with a DST change:
    the ledger takes it from there instead of reading the month again."""
    zone = ZoneInfo("Europe/Berlin")  # DST starts on 2026-03-29
    data = SourceData()
    data.account("acct-1").account("acct-2")
    data.project("p1", created="2026-01-02", account="acct-1")
    data.project("p2", created="2026-01-02", account="acct-1")
    data.project("q1", created="2026-01-02", account="acct-2")
    data.compute("p1", "2026-02-28 23:30", "1")  # March 1, 00:30 in Berlin
    data.compute("p1", "2026-03-28 22:30", "0.1", count=300)  # March 28, 23:30
    data.compute("p2", "2026-03-28 23:30", "2")  # March 29, 00:30
    data.compute("p1", "2026-03-29 22:30", "3")  # March 30, 00:30 (summer time)
    data.compute("p2", "2026-03-31 22:30", "4")  # April 1: not March
    data.compute("p2", "2026-03-10 10:00", None)  # missing: never counted
    data.compute("q1", "2026-03-10 10:00", "5")  # another account
    data.compute("p2", "2026-03-01 12:00", "0.5")  # March 1 too: p1's day, the same account
    engine = make_engine(db_url)
    try:
        data.write(engine)
        march = (date(2026, 3, 1), date(2026, 3, 31))
        with engine.connect() as conn:
            read = read_compute_days(conn, *march, zone, Chunk(("acct-1",)))
            ledger = read_compute_per_day(conn, *march, zone, Chunk(("acct-1",)))
        days = read.frame
        per_project = {
            (p, a, int(d)): int(u)
            for p, a, d, u in days[["project_id", "account_id", "day", "compute_units"]].itertuples(
                index=False
            )
        }
        assert per_project == {
            ("p1", "acct-1", day_of("2026-03-01")): 10_000,
            ("p2", "acct-1", day_of("2026-03-01")): 5_000,
            ("p1", "acct-1", day_of("2026-03-28")): 300_000,
            ("p2", "acct-1", day_of("2026-03-29")): 20_000,
            ("p1", "acct-1", day_of("2026-03-30")): 30_000,
        }
        summed = days.groupby(["account_id", "day"], as_index=False)["compute_units"].sum()
        as_read = {(a, int(d)): int(u) for a, d, u in ledger.itertuples(index=False)}
        assert {(a, int(d)): int(u) for a, d, u in summed.itertuples(index=False)} == as_read
        # The sums the month-end takes from the same read, without grouping it again.
        per_day = read.per_account_day()
        assert {(a, int(d)): int(u) for a, d, u in per_day.itertuples(index=False)} == as_read
        assert len(per_day) == len(as_read)
        totals = {p: int(u) for p, u in read.per_project().itertuples(index=False)}
        assert totals == {"p1": 340_000, "p2": 25_000}
        assert as_read[("acct-1", day_of("2026-03-01"))] == 15_000
        with engine.connect() as conn:
            both = read_compute_days(conn, *march, zone, Chunk(("acct-1", "acct-2"))).per_account_day()
            read_both = read_compute_per_day(conn, *march, zone, Chunk(("acct-1", "acct-2")))
        assert {(a, int(d)): int(u) for a, d, u in both.itertuples(index=False)} == {
            (a, int(d)): int(u) for a, d, u in read_both.itertuples(index=False)
        }
        assert len(both) == len(read_both) == 5
    finally:
        engine.dispose()


def test_a_ledger_chunk_reads_only_the_days_it_was_not_given(db_url: str) -> None:
    """Days inside the known compute come from it (a sentinel value here, not what the
    table holds); days before it are read."""
    zone = ZoneInfo("UTC")
    data = SourceData()
    data.account("acct-1")
    data.project("p1", created="2026-01-02", account="acct-1")
    data.compute("p1", "2026-02-27 10:00", "1")
    data.compute("p1", "2026-03-05 10:00", "2")
    known = KnownCompute(
        date(2026, 3, 1),
        date(2026, 3, 31),
        pd.DataFrame(
            {
                "account_id": ["acct-1", "acct-1", "acct-9"],
                "day": [day_of("2026-03-05"), day_of("2026-03-20"), day_of("2026-03-05")],
                "compute_units": [777, 888, 999],
            }
        ),
    )
    engine = make_engine(db_url)
    try:
        data.write(engine)
        chunk = Chunk(("acct-1",))
        with engine.connect() as conn:
            got = compute_per_day(
                conn, date(2026, 2, 1), date(2026, 3, 10), zone, chunk, known.of(["acct-1"])
            )
        assert sorted((a, int(d), int(u)) for a, d, u in got.itertuples(index=False)) == [
            ("acct-1", day_of("2026-02-27"), 10_000),
            ("acct-1", day_of("2026-03-05"), 777),
        ]
    finally:
        engine.dispose()
