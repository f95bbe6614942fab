"""The chunk reads of the source tables, checked row for row on both back ends.

`read_cloud_usage` brings back one row per project and metric (the rows' days and
quantities as one text) and sums the rows of a day in numpy; the reject scans find
unknown projects through each distinct project id. Both must give what a plain
per-row reading of the rules gives.
"""

from __future__ import annotations

from datetime import date

from billing_jobs.db import reads
from billing_jobs.db.engine import make_engine
from billing_jobs.db.sql import Chunk
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
        ]
        assert empty.empty
        assert list(empty.columns) == ["project_id", "day", "metric", "quantity_units"]
    finally:
        engine.dispose()


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
