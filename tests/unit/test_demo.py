"""The demo and benchmark data generators, on SQLite files."""

from __future__ import annotations

import datetime as dt
import re
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, insert

from billing_jobs.db.source_tables import accounts, source_metadata
from billing_jobs.demo import (
    DEMO_BAD_ROWS,
    EFFECTIVE_DATE,
    UNKNOWN_PROJECT_ID,
    generate_bulk,
    generate_demo,
)

KINDS = {"archived", "restored", "deleted", "published", "unpublished"}
METRICS = {"page_views", "bandwidth_gb", "data_storage_gb", "domains"}
TABLES = {
    "accounts": "account_id",
    "projects": "project_id",
    "project_events": "event_id",
    "compute_usage": "usage_id",
    "cloud_usage": "usage_id",
}
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(\.\d{6})?$")
AS_OF = dt.date(2026, 10, 31)


def _engine(path: Path) -> Engine:
    return create_engine(f"sqlite:///{path}")


def _rows(engine: Engine, sql: str) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.exec_driver_sql(sql).all())


def _dump(engine: Engine) -> dict[str, list[Any]]:
    """Every table's rows as text, amounts included, in key order."""
    dump = {}
    for table, key in TABLES.items():
        dump[table] = _rows(
            engine,
            f"SELECT *, typeof({'credits' if table == 'compute_usage' else key}) FROM {table} ORDER BY {key}",
        )
    return dump


def _exact(text: str | None) -> Decimal:
    """The stored amount's own text, read exactly; fails on anything not a finite decimal."""
    assert text is not None
    value = Decimal(text)
    assert value.is_finite()
    return value


def _is_ten_thousandths(value: Decimal) -> bool:
    return (value * 10_000) % 1 == 0


def _ts(text: str) -> dt.datetime:
    assert TIMESTAMP.match(text), text
    return dt.datetime.fromisoformat(text)


def _at(year: int, month: int, day: int) -> dt.datetime:
    """A naive UTC instant, as the source tables hold them."""
    return dt.datetime.combine(dt.date(year, month, day), dt.time())


FOREVER = _at(9999, 12, 31)


class History:
    """A small reference replay of the lifecycle rules over the source tables."""

    def __init__(self, engine: Engine) -> None:
        self.created = {
            pid: _ts(at) for pid, at in _rows(engine, "SELECT project_id, created_at FROM projects")
        }
        self.rejected: dict[str, str] = {}
        self.state_at_event: dict[str, str] = {}
        self.published: dict[str, list[tuple[dt.datetime, dt.datetime]]] = defaultdict(list)
        self._state: dict[str, str] = {}
        self._published_from: dict[str, dt.datetime] = {}
        events = _rows(
            engine,
            "SELECT event_id, project_id, occurred_at, kind FROM project_events "
            "ORDER BY occurred_at, event_id",
        )
        for event_id, pid, text, kind in events:
            reason = self._apply(event_id, pid, _ts(text), kind)
            if reason is not None:
                self.rejected[event_id] = reason
        for pid, since in self._published_from.items():
            self.published[pid].append((since, FOREVER))

    def _apply(self, event_id: str, pid: str, at: dt.datetime, kind: str) -> str | None:
        """Applies one event; returns why it is rejected, if it is."""
        if pid not in self.created:
            return "unknown project"
        current = self._state.setdefault(pid, "active")
        self.state_at_event[event_id] = current
        since = self._published_from.get(pid)
        if kind not in KINDS:
            return "unknown kind"
        if at < self.created[pid]:
            return "before creation"
        if current == "deleted":
            return "after deletion"
        if (kind, current) in {("archived", "active"), ("restored", "archived")}:
            self._state[pid] = "archived" if kind == "archived" else "active"
        elif kind == "deleted":
            self._state[pid] = "deleted"
            self._unpublish(pid, at)
        elif kind == "published" and since is None:
            self._published_from[pid] = at
        elif kind == "unpublished" and since is not None:
            self._unpublish(pid, at)
        else:
            return f"{kind} while {current}"
        return None

    def _unpublish(self, pid: str, at: dt.datetime) -> None:
        since = self._published_from.pop(pid, None)
        if since is not None:
            self.published[pid].append((since, at))

    def is_published_on(self, pid: str, day: dt.date) -> bool:
        start = dt.datetime.combine(day, dt.time())
        end = start + dt.timedelta(days=1)
        return any(a < end and b > start for a, b in self.published.get(pid, []))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Engine, Any]:
    engine = _engine(tmp_path_factory.mktemp("demo") / "demo.db")
    summary = generate_demo(engine, seed=7, accounts=40, as_of=AS_OF)
    return engine, summary


@pytest.fixture(scope="module")
def history(demo: tuple[Engine, Any]) -> History:
    return History(demo[0])


def test_the_same_seed_gives_identical_tables_and_another_seed_does_not(tmp_path: Path) -> None:
    first, second, other = (_engine(tmp_path / f"{n}.db") for n in ("a", "b", "c"))
    generate_demo(first, seed=11, accounts=6)
    generate_demo(second, seed=11, accounts=6)
    generate_demo(other, seed=12, accounts=6)

    assert _dump(first) == _dump(second)
    assert _dump(first)["compute_usage"] != _dump(other)["compute_usage"]


def test_the_summary_counts_match_the_tables(demo: tuple[Engine, Any]) -> None:
    engine, summary = demo
    for table in TABLES:
        assert summary.counts()[table] == _rows(engine, f"SELECT count(*) FROM {table}")[0][0]
    assert {(b.table, b.row_id, b.reason) for b in summary.bad_rows} == set(DEMO_BAD_ROWS)


def test_the_default_demo_has_a_few_hundred_projects_and_tens_of_thousands_of_usage_rows(
    demo: tuple[Engine, Any],
) -> None:
    _, summary = demo
    assert 150 <= summary.projects <= 600
    assert summary.compute_usage >= 10_000
    assert summary.cloud_usage >= 10_000


def test_projects_are_created_on_both_sides_of_the_effective_date(
    demo: tuple[Engine, Any],
) -> None:
    engine, _ = demo
    created = [_ts(t) for (t,) in _rows(engine, "SELECT created_at FROM projects")]
    effective = dt.datetime.combine(EFFECTIVE_DATE, dt.time())
    assert sum(t < effective for t in created) >= 50
    assert sum(t >= effective for t in created) >= 50
    assert min(created) >= _at(2025, 6, 1)
    assert max(created) < dt.datetime.combine(AS_OF + dt.timedelta(days=1), dt.time())


def test_accounts_are_personal_and_team_and_predate_their_projects(
    demo: tuple[Engine, Any],
) -> None:
    engine, _ = demo
    kinds = {k for (k,) in _rows(engine, "SELECT kind FROM accounts")}
    assert kinds == {"personal", "team"}
    late = _rows(
        engine,
        "SELECT count(*) FROM projects p JOIN accounts a USING (account_id) "
        "WHERE a.created_at > p.created_at",
    )
    assert late == [(0,)]
    ids = [pid for (pid,) in _rows(engine, "SELECT project_id FROM projects")]
    assert all(re.fullmatch(r"prj-\d{4}-\d{2}", pid) for pid in ids)


def test_every_lifecycle_event_kind_occurs_in_valid_histories(
    demo: tuple[Engine, Any], history: History
) -> None:
    engine, _ = demo
    counts = dict(_rows(engine, "SELECT kind, count(*) FROM project_events GROUP BY kind"))
    for kind in ("archived", "restored", "deleted", "published"):
        assert counts[kind] >= 10, kind
    assert 1 <= counts["unpublished"] < counts["published"]


def test_exactly_the_intended_rows_are_bad_and_each_for_its_reason(
    demo: tuple[Engine, Any], history: History
) -> None:
    engine, summary = demo
    bad = {b.row_id: b for b in summary.bad_rows}
    projects = history.created
    effective = dt.datetime.combine(EFFECTIVE_DATE, dt.time())

    # Events: the replay rejects exactly the five bad ones, each for its reason.
    assert history.rejected == {
        "evt-bad-01": "restored while active",
        "evt-bad-02": "after deletion",
        "evt-bad-03": "before creation",
        "evt-bad-04": "unknown kind",
        "evt-bad-05": "unknown project",
    }
    assert history.state_at_event["evt-bad-04"] == "active"
    kinds = dict(_rows(engine, "SELECT event_id, kind FROM project_events WHERE event_id LIKE 'evt-bad-%'"))
    assert kinds["evt-bad-04"] not in KINDS
    assert kinds["evt-bad-05"] in KINDS
    assert bad["evt-bad-05"].project_id == UNKNOWN_PROJECT_ID not in projects

    # Compute: one unknown project, one NULL amount on a real project; the rest valid.
    compute = _rows(
        engine, "SELECT usage_id, project_id, occurred_at, CAST(credits AS TEXT) FROM compute_usage"
    )
    invalid = {}
    for usage_id, pid, at, credits in compute:
        if pid not in projects:
            invalid[usage_id] = "unknown project"
        elif credits is None:
            invalid[usage_id] = "missing"
        else:
            assert _ts(at) >= projects[pid], usage_id
    assert invalid == {"cu-bad-01": "unknown project", "cu-bad-02": "missing"}
    compute_bad = {row[0]: row for row in compute if row[0] in invalid}
    assert compute_bad["cu-bad-01"][3] is not None  # only its project is wrong

    # Cloud: the four bad ones, each wrong in one way only; the rest valid.
    cloud = _rows(
        engine,
        "SELECT usage_id, project_id, usage_date, metric, CAST(quantity AS TEXT) FROM cloud_usage",
    )
    invalid = {}
    for usage_id, pid, day_text, metric, quantity in cloud:
        day = dt.date.fromisoformat(day_text)
        assert pid in projects, usage_id
        assert dt.datetime.combine(day, dt.time()) >= effective, usage_id
        problems = []
        if metric not in METRICS:
            problems.append("unknown metric")
        if quantity is None:
            problems.append("missing")
        elif _exact(quantity) < 0:
            problems.append("negative")
        if not history.is_published_on(pid, day):
            problems.append("not published")
        if problems:
            invalid[usage_id] = problems
    assert invalid == {
        "cl-bad-01": ["not published"],
        "cl-bad-02": ["negative"],
        "cl-bad-03": ["unknown metric"],
        "cl-bad-04": ["missing"],
    }


def test_bad_rows_are_dated_on_or_after_the_effective_date(demo: tuple[Engine, Any]) -> None:
    engine, _ = demo
    dates = _rows(
        engine,
        "SELECT occurred_at FROM project_events WHERE event_id LIKE 'evt-bad-%' "
        "UNION ALL SELECT occurred_at FROM compute_usage WHERE usage_id LIKE 'cu-bad-%' "
        "UNION ALL SELECT usage_date FROM cloud_usage WHERE usage_id LIKE 'cl-bad-%'",
    )
    assert len(dates) == 11
    assert all(d >= EFFECTIVE_DATE.isoformat() for (d,) in dates)


def test_valid_amounts_are_exact_decimals_never_binary_noise(demo: tuple[Engine, Any]) -> None:
    engine, _ = demo
    rows = _rows(
        engine,
        "SELECT typeof(credits), CAST(credits AS TEXT) FROM compute_usage WHERE credits IS NOT NULL",
    )
    assert {storage for storage, _ in rows} <= {"real", "integer"}
    amounts = [_exact(text) for _, text in rows]
    assert all(_is_ten_thousandths(a) for a in amounts)
    positive = [a for a in amounts if a > 0]
    assert min(positive) >= Decimal("0.0125")
    assert max(amounts) <= Decimal("3.5")
    assert 1 <= sum(a < 0 for a in amounts) <= 60  # a few reversals

    cloud = _rows(
        engine,
        "SELECT metric, typeof(quantity), CAST(quantity AS TEXT) FROM cloud_usage "
        "WHERE quantity IS NOT NULL AND usage_id NOT LIKE 'cl-bad-%'",
    )
    for metric, storage, text in cloud:
        value = _exact(text)
        assert storage in {"real", "integer"}
        assert _is_ten_thousandths(value), (metric, text)
        assert value >= 0
        if metric in {"page_views", "domains"}:
            assert storage == "integer"
        if metric == "domains":
            assert value in {0, 1, 2}


def test_amounts_are_sent_to_the_database_as_decimals(tmp_path: Path) -> None:
    engine = _engine(tmp_path / "demo.db")
    seen: set[type] = set()

    @event.listens_for(engine, "before_execute")
    def _collect(conn: Any, clause: Any, multiparams: Any, params: Any, options: Any) -> None:
        for batch in multiparams:
            for row in batch if isinstance(batch, list) else [batch]:
                for key in ("credits", "quantity"):
                    if key in row:
                        seen.add(type(row[key]))

    generate_demo(engine, seed=3, accounts=4)
    assert seen == {Decimal, type(None)}


def test_some_projects_cross_the_waiver_threshold_and_some_stay_just_below(
    demo: tuple[Engine, Any],
) -> None:
    engine, _ = demo
    monthly = _rows(
        engine,
        "SELECT project_id, substr(occurred_at, 1, 7), "
        "group_concat(CAST(credits AS TEXT), ' ') FROM compute_usage "
        "WHERE credits IS NOT NULL GROUP BY 1, 2",
    )
    totals = [sum(Decimal(t) for t in texts.split(" ")) for _, _, texts in monthly]
    assert sum(t >= 30 for t in totals) >= 20
    assert sum(Decimal(27) <= t < 30 for t in totals) >= 20
    assert Decimal("30.0000") in totals
    assert Decimal("29.9999") in totals


def test_timestamps_are_naive_utc_text_with_optional_microseconds(
    demo: tuple[Engine, Any],
) -> None:
    engine, _ = demo
    for table, column in (
        ("accounts", "created_at"),
        ("projects", "created_at"),
        ("project_events", "occurred_at"),
        ("compute_usage", "occurred_at"),
    ):
        texts = [t for (t,) in _rows(engine, f"SELECT {column} FROM {table}")]
        assert all(TIMESTAMP.match(t) for t in texts), table
        assert max(texts) < (AS_OF + dt.timedelta(days=1)).isoformat(), table


def test_it_refuses_a_database_whose_accounts_hold_rows(tmp_path: Path) -> None:
    engine = _engine(tmp_path / "real.db")
    source_metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(accounts).values(
                account_id="acct-real", kind="team", name="Real", created_at=_at(2025, 1, 1)
            )
        )

    with pytest.raises(ValueError, match="'accounts' already holds rows"):
        generate_demo(engine)
    with pytest.raises(ValueError, match="'accounts' already holds rows"):
        generate_bulk(engine, projects=10, usage_rows_per_month=10, months=[(2026, 5)])

    assert _rows(engine, "SELECT count(*) FROM projects") == [(0,)]
    assert _rows(engine, "SELECT account_id FROM accounts") == [("acct-real",)]


def test_it_rejects_too_few_accounts_and_an_as_of_before_a_full_month_of_fees(
    tmp_path: Path,
) -> None:
    engine = _engine(tmp_path / "demo.db")
    with pytest.raises(ValueError, match="accounts"):
        generate_demo(engine, accounts=2)
    with pytest.raises(ValueError, match="as_of"):
        generate_demo(engine, as_of=dt.date(2026, 4, 1))


def test_bulk_writes_consistent_exact_rows(tmp_path: Path) -> None:
    engine = _engine(tmp_path / "bulk.db")
    months = [(2026, 5), (2026, 6)]
    summary = generate_bulk(engine, projects=1_000, usage_rows_per_month=5_000, months=months, seed=5)

    for table in TABLES:
        assert summary.counts()[table] == _rows(engine, f"SELECT count(*) FROM {table}")[0][0]
    assert summary.projects == 1_000
    assert summary.accounts == 125
    assert summary.compute_usage == 10_000
    assert summary.cloud_usage > 0

    history = History(engine)
    assert history.rejected == {}
    compute = _rows(
        engine,
        "SELECT project_id, occurred_at, typeof(credits), CAST(credits AS TEXT) FROM compute_usage",
    )
    for pid, at, storage, text in compute:
        assert storage in {"real", "integer"}
        value = _exact(text)
        assert _is_ten_thousandths(value)
        assert Decimal("0.0125") <= abs(value) <= Decimal("3.5")
        stamp = _ts(at)
        assert stamp >= history.created[pid]
        assert _at(2026, 5, 1) <= stamp < _at(2026, 7, 1)
    cloud = _rows(engine, "SELECT project_id, usage_date, metric, CAST(quantity AS TEXT) FROM cloud_usage")
    for pid, day, metric, text in cloud:
        assert metric in METRICS
        assert _is_ten_thousandths(_exact(text))
        assert _exact(text) >= 0
        assert history.is_published_on(pid, dt.date.fromisoformat(day))


def test_bulk_is_deterministic(tmp_path: Path) -> None:
    first, second = _engine(tmp_path / "a.db"), _engine(tmp_path / "b.db")
    for engine in (first, second):
        generate_bulk(engine, projects=300, usage_rows_per_month=1_000, months=[(2026, 5)], seed=9)
    assert _dump(first) == _dump(second)
