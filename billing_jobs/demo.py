"""Demo and benchmark data for the five source tables.

`generate_demo` fills an empty database with a small, realistic and fully
deterministic platform history (accounts, projects and their lifecycle events,
compute usage, daily cloud usage of published projects) around the effective
date of the storage fee, plus one deliberate bad row of each kind that
`billing-rules.md` lists as bad input (see `DEMO_BAD_ROWS`).

`generate_bulk` writes large volumes fast for benchmarks (vectorized with numpy;
`executemany` of tuples on SQLite, `COPY` on PostgreSQL).

Both take every random choice from a seeded `numpy.random.Generator` and never
read the clock: the same arguments give the same rows. Both create the source
tables from `source_metadata` and refuse to touch a database whose source
tables already hold rows. Amounts are exact: `Decimal` values in the demo,
4-decimal strings such as ``"0.1250"`` in bulk, never binary floats computed
here. (On SQLite a NUMERIC column stores a decimal value as REAL or INTEGER
whatever the client sends; the stored value's text is still the intended
decimal, e.g. ``0.0125``.)
"""

from __future__ import annotations

import calendar
import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import numpy as np
from sqlalchemy import Engine, Table, func, select
from sqlalchemy.engine import Connection

from billing_jobs.db.source_tables import (
    SOURCE_TABLES,
    cloud_usage,
    compute_usage,
    project_events,
    projects,
    redemption_codes,
    refund_requests,
    source_metadata,
    top_ups,
)
from billing_jobs.db.source_tables import accounts as accounts_table
from billing_jobs.rules.credits import TopUpTerms, price_cents
from billing_jobs.settings import DEFAULT_TIERS

# The default `storage_fee.effective_from`; the demo spreads projects on both sides.
EFFECTIVE_DATE = dt.date(2026, 3, 24)
FIRST_PROJECT_DAY = dt.date(2025, 6, 1)
# The demo needs a full month after the effective date to show every fee.
EARLIEST_AS_OF = dt.date(2026, 4, 30)
MIN_DEMO_ACCOUNTS = 3

METRICS = ("page_views", "bandwidth_gb", "data_storage_gb", "domains")

# A project id that the generators never produce (account numbers start at 1).
UNKNOWN_PROJECT_ID = "prj-0000-00"

INSERT_CHUNK_ROWS = 10_000

_EPOCH = dt.datetime.combine(dt.date(1970, 1, 1), dt.time())  # naive UTC, as stored
_US = 1
_SECOND_US = 1_000_000 * _US
_HOUR_US = 3600 * _SECOND_US
_DAY_US = 24 * _HOUR_US
_MIN_CREDITS = 125  # 0.0125 credits, in ten-thousandths
_MAX_CREDITS = 35_000  # 3.5 credits
_THRESHOLD = 300_000  # 30 credits, the default waiver threshold


@dataclass(frozen=True)
class BadRow:
    """One deliberate bad source row and the reason the jobs should reject it for."""

    table: str
    row_id: str
    project_id: str
    reason: str


# The bad rows `generate_demo` always writes: same ids whatever the seed.
# Their project ids (other than the unknown one) depend on the seed; see
# `DemoSummary.bad_rows`.
DEMO_BAD_ROWS: tuple[tuple[str, str, str], ...] = (
    ("compute_usage", "cu-bad-01", "unknown project"),
    ("compute_usage", "cu-bad-02", "missing amount (NULL credits)"),
    ("project_events", "evt-bad-01", "impossible event: restored while active"),
    ("project_events", "evt-bad-02", "impossible event: after deletion"),
    ("project_events", "evt-bad-03", "event before the project's creation"),
    ("project_events", "evt-bad-04", "unknown event kind"),
    ("project_events", "evt-bad-05", "unknown project"),
    ("cloud_usage", "cl-bad-01", "usage on a day the project was not published"),
    ("cloud_usage", "cl-bad-02", "negative quantity"),
    ("cloud_usage", "cl-bad-03", "unknown metric"),
    ("cloud_usage", "cl-bad-04", "missing amount (NULL quantity)"),
)


@dataclass(frozen=True)
class DemoSummary:
    """What `generate_demo` wrote: rows per table (bad rows included)."""

    seed: int
    as_of: dt.date
    accounts: int
    projects: int
    project_events: int
    compute_usage: int
    cloud_usage: int
    bad_rows: tuple[BadRow, ...] = field(default=())
    top_ups: int = 0
    redemption_codes: int = 0
    refund_requests: int = 0
    bad_top_ups: tuple[BadRow, ...] = field(default=())

    def counts(self) -> dict[str, int]:
        return {
            "accounts": self.accounts,
            "projects": self.projects,
            "project_events": self.project_events,
            "compute_usage": self.compute_usage,
            "cloud_usage": self.cloud_usage,
            "top_ups": self.top_ups,
            "redemption_codes": self.redemption_codes,
            "refund_requests": self.refund_requests,
        }


@dataclass(frozen=True)
class BulkSummary:
    """What `generate_bulk` wrote: rows per table."""

    seed: int
    accounts: int
    projects: int
    project_events: int
    compute_usage: int
    cloud_usage: int
    top_ups: int = 0

    def counts(self) -> dict[str, int]:
        return {
            "accounts": self.accounts,
            "projects": self.projects,
            "project_events": self.project_events,
            "compute_usage": self.compute_usage,
            "cloud_usage": self.cloud_usage,
            "top_ups": self.top_ups,
        }


# --------------------------------------------------------------------------- helpers


def _us(value: dt.datetime | dt.date) -> int:
    """Microseconds since the epoch of a naive UTC datetime or a date (its midnight)."""
    if not isinstance(value, dt.datetime):
        value = dt.datetime.combine(value, dt.time())
    return (value - _EPOCH) // dt.timedelta(microseconds=1)


def _dt(us: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(microseconds=int(us))


def _date(us: int) -> dt.date:
    return _dt(us).date()


def _month_start(year: int, month: int) -> dt.date:
    return dt.date(year, month, 1)


def _next_month(year: int, month: int) -> tuple[int, int]:
    return (year + 1, 1) if month == 12 else (year, month + 1)


def _from_ten_thousandths(ten_thousandths: int) -> Decimal:
    """An exact amount from integer ten-thousandths: 125 -> Decimal('0.0125')."""
    return Decimal(int(ten_thousandths)).scaleb(-4)


def _source_rows_present(conn: Connection) -> str | None:
    for table in SOURCE_TABLES:
        if conn.execute(select(func.count()).select_from(table)).scalar_one():
            return table.name
    return None


def _prepare(conn: Connection) -> None:
    """Create the source tables; refuse if any already holds rows."""
    source_metadata.create_all(conn)
    occupied = _source_rows_present(conn)
    if occupied is not None:
        raise ValueError(
            f"refusing to generate data: source table {occupied!r} already holds rows "
            "(generated data must never mix into real data; use an empty database)"
        )


def _insert(conn: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """Bulk insert within the connection's transaction: executemany in chunks, or on
    PostgreSQL a COPY (psycopg's executemany sends one statement per row)."""
    if conn.dialect.name != "postgresql":
        for start in range(0, len(rows), INSERT_CHUNK_ROWS):
            conn.execute(table.insert(), list(rows[start : start + INSERT_CHUNK_ROWS]))
        return
    columns = [c.name for c in table.columns]
    cursor: Any = conn.connection.cursor()
    try:
        with cursor.copy(f"COPY {table.name} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(tuple(row[c] for c in columns))
    finally:
        cursor.close()


def _split_total(rng: np.random.Generator, total: int) -> list[int]:
    """Row amounts in [0.0125, 3.5] (ten-thousandths) that sum to exactly `total`.

    Amounts are log-uniform: many small charges, a few large ones.
    """
    rows: list[int] = []
    remaining = total
    log_low, log_high = np.log(_MIN_CREDITS), np.log(_MAX_CREDITS + 1)
    while remaining > _MAX_CREDITS:
        batch = np.exp(rng.uniform(log_low, log_high, size=64)).astype(np.int64)
        batch = np.clip(batch, _MIN_CREDITS, _MAX_CREDITS)
        fits = int(np.searchsorted(np.cumsum(batch), remaining - _MIN_CREDITS, side="right"))
        if fits == 0:  # close to the end: one amount that leaves at least the minimum
            high = min(_MAX_CREDITS, remaining - _MIN_CREDITS)
            batch, fits = rng.integers(_MIN_CREDITS, high + 1, size=1), 1
        rows.extend(int(v) for v in batch[:fits])
        remaining -= int(batch[:fits].sum())
    rows.append(remaining)
    rng.shuffle(rows)
    return rows


# --------------------------------------------------------------------------- demo


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_FIRST_NAMES = _words(
    "Ada Bruno Chen Dana Elif Farid Grace Hana Ivan Jun Kofi Lena Mateo Nadia Omar Priya "
    "Quinn Rosa Sven Tariq Uma Viktor Wen Ximena Yusuf Zoe"
)
_LAST_NAMES = _words(
    "Alvarez Becker Costa Dubois Eriksen Fischer Garcia Haddad Ito Jensen Kowalski Li "
    "Moreau Nakamura Okafor Petrov Rossi Schmidt Tanaka Umarov Varga Wang Yilmaz Zhou"
)
_TEAM_WORDS = _words(
    "Acme Bluebell Cobalt Driftwood Ember Foxglove Granite Harbor Indigo Juniper Kestrel "
    "Lumen Meridian Northwind Orchid Pinecone Quarry Redwood Saltmarsh Tidewater"
)
_TEAM_SUFFIXES = ("Labs", "Studio", "Team", "Analytics", "Works", "Digital", "Collective")
_ADJECTIVES = _words(
    "quiet bright rapid amber lucky silent brave clever gentle hidden little mighty nimble "
    "proud swift tidy wild cosmic"
)
_NOUNS = _words(
    "harbor meadow pixel rocket garden ledger atlas beacon canvas dashboard forge journal "
    "kiosk lantern market notebook portal quiz recipe shop tracker wiki blog chatbot "
    "portfolio"
)

# Roles of a few projects whose history is fixed so that each bad row is bad for
# exactly one reason, and so that the waiver threshold is hit exactly.
_ROLE_PLAIN_A = "plain_a"  # created before E, no events: restored-while-active, not published
_ROLE_PLAIN_B = "plain_b"  # created before E, no events: unknown event kind, NULL credits
_ROLE_LATE = "late"  # created after E, no events: event before creation
_ROLE_DELETED = "deleted"  # deleted after E: event after deletion
_ROLE_PUBLISHED = "published"  # published around E, never unpublished: bad cloud rows
_ROLE_EDGE_AT = "edge_at"  # compute of exactly 30.0000 in one month
_ROLE_EDGE_BELOW = "edge_below"  # compute of exactly 29.9999 in the same month
_ROLES = (
    _ROLE_PLAIN_A,
    _ROLE_PLAIN_B,
    _ROLE_LATE,
    _ROLE_DELETED,
    _ROLE_PUBLISHED,
    _ROLE_EDGE_AT,
    _ROLE_EDGE_BELOW,
)

# Compute usage profiles: share of projects, chance a month follows the profile,
# monthly total range in ten-thousandths.
_PROFILES = {
    "heavy": (0.15, 0.85, (305_000, 900_000)),
    "borderline": (0.10, 0.80, (270_000, 299_999)),
    "light": (0.45, 0.70, (500, 120_000)),
    "idle": (0.30, 0.10, (125, 10_000)),
}


@dataclass
class _Project:
    account_no: int
    created_us: int
    role: str | None = None
    project_id: str = ""
    name: str = ""
    profile: str = "light"
    events: list[tuple[int, str]] = field(default_factory=list)


def _lifecycle(rng: np.random.Generator, created_us: int, end_us: int) -> list[tuple[int, str]]:
    """A random valid event history for a project, before `end_us`."""
    events: list[tuple[int, str]] = []
    t = created_us
    archived = published = False
    for _ in range(8):
        t += _HOUR_US + int(rng.exponential(50 * _DAY_US))
        if t >= end_us:
            break
        if archived:
            choices = ["restored", "deleted", "published", "stop"]
            weights = [0.40, 0.25, 0.0 if published else 0.05, 0.30]
        elif published:
            choices = ["unpublished", "archived", "deleted", "stop"]
            weights = [0.15, 0.20, 0.08, 0.57]
        else:
            choices = ["published", "archived", "deleted", "stop"]
            weights = [0.32, 0.28, 0.08, 0.32]
        p = np.array(weights) / sum(weights)
        kind = choices[int(rng.choice(len(choices), p=p))]
        if kind == "stop":
            break
        events.append((t, kind))
        if kind == "archived":
            archived = True
        elif kind == "restored":
            archived = False
        elif kind == "published":
            published = True
        elif kind == "unpublished":
            published = False
        elif kind == "deleted":
            break
    return events


def _intervals(
    created_us: int, events: Iterable[tuple[int, str]], end_us: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Active and published intervals `[from, to)` of a valid history, cut at `end_us`."""
    active: list[tuple[int, int]] = []
    published: list[tuple[int, int]] = []
    active_from: int | None = created_us
    published_from: int | None = None
    for t, kind in sorted(events):
        if kind == "archived" and active_from is not None:
            active.append((active_from, t))
            active_from = None
        elif kind == "restored" and active_from is None:
            active_from = t
        elif kind == "published" and published_from is None:
            published_from = t
        elif kind == "unpublished" and published_from is not None:
            published.append((published_from, t))
            published_from = None
        elif kind == "deleted":
            if active_from is not None:
                active.append((active_from, t))
            if published_from is not None:
                published.append((published_from, t))
            active_from = published_from = None
            break
    if active_from is not None:
        active.append((active_from, end_us))
    if published_from is not None:
        published.append((published_from, end_us))

    def cut(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return [(a, min(b, end_us)) for a, b in spans if a < min(b, end_us)]

    return cut(active), cut(published)


def _place(rng: np.random.Generator, segments: list[tuple[int, int]], size: int) -> np.ndarray:
    """`size` sorted instants drawn uniformly from the union of disjoint segments."""
    lengths = np.array([b - a for a, b in segments], dtype=np.int64)
    starts = np.array([a for a, _ in segments], dtype=np.int64)
    offsets = np.sort(rng.integers(0, int(lengths.sum()), size=size, dtype=np.int64))
    before = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    which = np.searchsorted(np.cumsum(lengths), offsets, side="right")
    return starts[which] + (offsets - before[which])


def _months(first: dt.date, last: dt.date) -> list[tuple[int, int]]:
    months = []
    year, month = first.year, first.month
    while (year, month) <= (last.year, last.month):
        months.append((year, month))
        year, month = _next_month(year, month)
    return months


def _edge_month(as_of: dt.date) -> tuple[int, int]:
    """The last whole month up to `as_of`."""
    if as_of.day == calendar.monthrange(as_of.year, as_of.month)[1]:
        return as_of.year, as_of.month
    return (as_of.year - 1, 12) if as_of.month == 1 else (as_of.year, as_of.month - 1)


def _compute_rows(
    rng: np.random.Generator,
    project: _Project,
    *,
    active: list[tuple[int, int]],
    as_of: dt.date,
    end_us: int,
    edge_month: tuple[int, int],
) -> list[tuple[int, str, int]]:
    """(occurred_at, project_id, ten-thousandths) rows of one project."""
    rows: list[tuple[int, str, int]] = []
    _, follows, (low, high) = _PROFILES[project.profile]
    for year, month in _months(_date(project.created_us), as_of):
        m_start = _us(_month_start(year, month))
        m_end = min(_us(_month_start(*_next_month(year, month))), end_us)
        segments = [(max(a, m_start), min(b, m_end)) for a, b in active]
        segments = [(a, b) for a, b in segments if b - a >= _HOUR_US]
        if not segments:
            continue
        exact = (year, month) == edge_month and project.role in (_ROLE_EDGE_AT, _ROLE_EDGE_BELOW)
        if exact:
            total = _THRESHOLD if project.role == _ROLE_EDGE_AT else _THRESHOLD - 1
        elif rng.random() < follows:
            total = int(rng.integers(low, high + 1))
        elif project.profile in ("heavy", "borderline") and rng.random() < 0.8:
            total = int(rng.integers(*_PROFILES["light"][2]))
        else:
            continue
        amounts = _split_total(rng, total)
        times = _place(rng, segments, len(amounts))
        month_rows = [(int(t), project.project_id, a) for t, a in zip(times, amounts, strict=True)]
        # Now and then a charge is reversed later in the month: a negative row.
        if not exact and len(month_rows) >= 3 and rng.random() < 0.012:
            t, _, amount = month_rows[int(rng.integers(0, len(month_rows) - 1))]
            later = [(max(a, t + _SECOND_US), b) for a, b in segments if b > t + _SECOND_US]
            later = [(a, b) for a, b in later if b > a]
            if later:
                month_rows.append((int(_place(rng, later, 1)[0]), project.project_id, -amount))
        rows.extend(month_rows)
    return rows


def _cloud_rows(
    rng: np.random.Generator, project_id: str, published: list[tuple[int, int]], as_of: dt.date
) -> list[tuple[dt.date, str, str, Decimal]]:
    """Daily (usage_date, project_id, metric, quantity) rows on the project's published days."""
    days: set[dt.date] = set()
    for a, b in published:
        first = max(_date(a), EFFECTIVE_DATE)
        last = min(_date(b - 1), as_of)  # the day holding the interval's last instant
        days.update(first + dt.timedelta(n) for n in range((last - first).days + 1))
    if not days:
        return []
    ordered = sorted(days)
    n = len(ordered)
    # Floats only shape the random traffic; every quantity below is whole ten-thousandths.
    base_views = float(rng.lognormal(np.log(400), 1.1))
    weekday = np.array([1.0, 1.05, 1.05, 1.0, 0.95, 0.7, 0.65])[[d.weekday() for d in ordered]]
    growth = np.linspace(1.0, float(rng.uniform(0.8, 2.5)), n)
    views = rng.poisson(base_views * weekday * growth)
    mb_per_view = float(rng.uniform(0.3, 3.0))
    noise = rng.uniform(0.85, 1.15, size=n)
    bandwidth = np.rint(views * mb_per_view / 1024 * 10_000 * noise).astype(np.int64)
    storage = int(rng.integers(500, 50_000)) + np.cumsum(rng.integers(0, 120, size=n))
    domains = np.full(n, int(rng.choice(3, p=[0.4, 0.45, 0.15])))
    if rng.random() < 0.3:
        domains[int(rng.integers(0, n)) :] = int(rng.choice(3))
    rows: list[tuple[dt.date, str, str, Decimal]] = []
    for i, day in enumerate(ordered):
        rows.append((day, project_id, "page_views", Decimal(int(views[i]))))
        rows.append((day, project_id, "bandwidth_gb", _from_ten_thousandths(bandwidth[i])))
        rows.append((day, project_id, "data_storage_gb", _from_ten_thousandths(storage[i])))
        rows.append((day, project_id, "domains", Decimal(int(domains[i]))))
    return rows


def _uniform_us(rng: np.random.Generator, low_us: int, high_us: int) -> int:
    return int(rng.integers(low_us, high_us))


def _plan_projects(rng: np.random.Generator, accounts: int, end_us: int) -> tuple[list[str], list[_Project]]:
    """Account kinds, and each project's account and creation instant (roles included)."""
    start_us = _us(FIRST_PROJECT_DAY)
    effective_us = _us(EFFECTIVE_DATE)
    kinds = ["team" if rng.random() < 0.3 else "personal" for _ in range(accounts)]
    plan: list[_Project] = []
    for account_no, kind in enumerate(kinds, start=1):
        count = int(rng.integers(5, 17) if kind == "team" else rng.integers(3, 10))
        plan.extend(
            _Project(account_no=account_no, created_us=_uniform_us(rng, start_us, end_us - _HOUR_US))
            for _ in range(count)
        )
    # A few projects get a fixed history (see the roles above).
    chosen = rng.choice(len(plan), size=len(_ROLES), replace=False)
    for role, index in zip(_ROLES, chosen, strict=True):
        project = plan[int(index)]
        project.role = role
        if role == _ROLE_LATE:
            low, high = effective_us + _DAY_US, end_us - 10 * _DAY_US
        elif role in (_ROLE_DELETED, _ROLE_PUBLISHED):
            low, high = start_us, effective_us - 90 * _DAY_US
        else:
            low, high = start_us, effective_us - _DAY_US
        project.created_us = _uniform_us(rng, low, high)
    return kinds, plan


def _name_rows(
    rng: np.random.Generator, kinds: list[str], plan: list[_Project]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Account and project rows; project ids number each account's projects by creation."""
    width = max(4, len(str(len(kinds))))
    by_account: dict[int, list[_Project]] = defaultdict(list)
    for project in plan:
        by_account[project.account_no].append(project)
    account_rows: list[dict[str, Any]] = []
    project_rows: list[dict[str, Any]] = []
    for account_no, kind in enumerate(kinds, start=1):
        account_id = f"acct-{account_no:0{width}d}"
        members = sorted(by_account[account_no], key=lambda p: p.created_us)
        if kind == "team":
            name = f"{rng.choice(_TEAM_WORDS)} {rng.choice(_TEAM_SUFFIXES)}"
        else:
            name = f"{rng.choice(_FIRST_NAMES)} {rng.choice(_LAST_NAMES)}"
        created = members[0].created_us - _uniform_us(rng, _HOUR_US, 20 * _DAY_US)
        account_rows.append(
            {"account_id": account_id, "kind": kind, "name": name, "created_at": _dt(created)}
        )
        for k, project in enumerate(members, start=1):
            project.project_id = f"prj-{account_no:0{width}d}-{k:02d}"
            project.name = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
            project_rows.append(
                {
                    "project_id": project.project_id,
                    "account_id": account_id,
                    "name": project.name,
                    "created_at": _dt(project.created_us),
                }
            )
    return account_rows, project_rows


def _assign_histories(rng: np.random.Generator, plan: list[_Project], end_us: int) -> None:
    """Each project's usage profile and valid lifecycle events."""
    effective_us = _us(EFFECTIVE_DATE)
    names = list(_PROFILES)
    shares = np.array([_PROFILES[n][0] for n in names])
    for project in plan:
        project.profile = names[int(rng.choice(len(names), p=shares))]
        if project.role is None:
            project.events = _lifecycle(rng, project.created_us, end_us)
        elif project.role == _ROLE_DELETED:
            low = max(project.created_us + 7 * _DAY_US, effective_us)
            project.events = [(_uniform_us(rng, low, end_us - 10 * _DAY_US), "deleted")]
        elif project.role == _ROLE_PUBLISHED:
            low = effective_us - 60 * _DAY_US
            project.events = [(_uniform_us(rng, low, effective_us + 5 * _DAY_US), "published")]
        if project.role in (_ROLE_EDGE_AT, _ROLE_EDGE_BELOW):
            project.profile = "light"


def _history_rows(
    rng: np.random.Generator, plan: list[_Project], as_of: dt.date, end_us: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Event, compute and cloud rows of the valid histories, ids in time order."""
    edge_month = _edge_month(as_of)
    events: list[tuple[int, str, str]] = []
    compute: list[tuple[int, str, int]] = []
    cloud: list[tuple[dt.date, str, str, Decimal]] = []
    for project in plan:
        events.extend((t, project.project_id, kind) for t, kind in project.events)
        active, published = _intervals(project.created_us, project.events, end_us)
        compute.extend(
            _compute_rows(rng, project, active=active, as_of=as_of, end_us=end_us, edge_month=edge_month)
        )
        cloud.extend(_cloud_rows(rng, project.project_id, published, as_of))
    events.sort()
    compute.sort()
    cloud.sort()
    event_rows = [
        {"event_id": f"evt-{n:06d}", "project_id": pid, "occurred_at": _dt(t), "kind": kind}
        for n, (t, pid, kind) in enumerate(events, start=1)
    ]
    compute_rows = [
        {
            "usage_id": f"cu-{n:07d}",
            "project_id": pid,
            "occurred_at": _dt(t),
            "credits": _from_ten_thousandths(amount),
        }
        for n, (t, pid, amount) in enumerate(compute, start=1)
    ]
    cloud_rows = [
        {
            "usage_id": f"cl-{n:07d}",
            "project_id": pid,
            "usage_date": day,
            "metric": metric,
            "quantity": quantity,
        }
        for n, (day, pid, metric, quantity) in enumerate(cloud, start=1)
    ]
    return event_rows, compute_rows, cloud_rows


def generate_demo(
    engine: Engine,
    *,
    seed: int = 7,
    accounts: int = 40,
    as_of: dt.date = dt.date(2026, 10, 31),
) -> DemoSummary:
    """Create the source tables and fill them with a deterministic demo history.

    `accounts` accounts (personal and team) hold a few hundred projects created
    from 2025-06 up to `as_of`, on both sides of the effective date; lifecycle
    events and compute usage run up to the end of `as_of`; cloud usage has one
    row per metric for every day a project is published, from the effective
    date on (the platform measures no billable cloud usage before it). The bad
    rows of `DEMO_BAD_ROWS` are added, dated on or after the effective date.
    All in one transaction.

    Raises ValueError if any source table already holds rows, if `accounts` is
    below 3, or if `as_of` is before 2026-04-30.
    """
    if accounts < MIN_DEMO_ACCOUNTS:
        raise ValueError(f"accounts must be at least {MIN_DEMO_ACCOUNTS}, got {accounts}")
    if as_of < EARLIEST_AS_OF:
        raise ValueError(f"as_of must be on or after {EARLIEST_AS_OF}, got {as_of}")

    with engine.begin() as conn:
        _prepare(conn)

        rng = np.random.default_rng(seed)
        end_us = _us(as_of + dt.timedelta(days=1))  # data runs to the end of `as_of`
        kinds, plan = _plan_projects(rng, accounts, end_us)
        account_rows, project_rows = _name_rows(rng, kinds, plan)
        _assign_histories(rng, plan, end_us)
        event_rows, compute_rows, cloud_rows = _history_rows(rng, plan, as_of, end_us)
        bad, bad_events, bad_compute, bad_cloud = _bad_rows(rng, plan, as_of, end_us)
        event_rows.extend(bad_events)
        compute_rows.extend(bad_compute)
        cloud_rows.extend(bad_cloud)

        _insert(conn, accounts_table, account_rows)
        _insert(conn, projects, project_rows)
        _insert(conn, project_events, event_rows)
        _insert(conn, compute_usage, compute_rows)
        _insert(conn, cloud_usage, cloud_rows)
        credit = _credit_rows(rng, [a["account_id"] for a in account_rows], as_of)
        _insert(conn, top_ups, credit.top_ups)
        _insert(conn, redemption_codes, credit.codes)
        _insert(conn, refund_requests, credit.refunds)

    return DemoSummary(
        seed=seed,
        as_of=as_of,
        accounts=len(account_rows),
        projects=len(project_rows),
        project_events=len(event_rows),
        compute_usage=len(compute_rows),
        cloud_usage=len(cloud_rows),
        bad_rows=bad,
        top_ups=len(credit.top_ups),
        redemption_codes=len(credit.codes),
        refund_requests=len(credit.refunds),
        bad_top_ups=credit.bad,
    )


# Top-ups the ledger must reject, one of each kind (see `_credit_rows`).
DEMO_BAD_TOP_UPS: tuple[tuple[str, str, str], ...] = (
    ("top_ups", "tu-bad-01", "unknown_account"),
    ("top_ups", "tu-bad-02", "below_smallest_top_up"),
    ("top_ups", "tu-bad-03", "code_already_redeemed"),
    ("top_ups", "tu-bad-04", "code_expired"),
)
DEMO_TIERS = TopUpTerms.of(DEFAULT_TIERS, dt.date(2026, 3, 26))
_TOP_UP_SIZES = (100, 250, 500, 1000, 2000, 5000, 20000)
TIERS_FROM = dt.date(2026, 3, 26)


@dataclass(frozen=True)
class _CreditRows:
    top_ups: list[dict[str, Any]]
    codes: list[dict[str, Any]]
    refunds: list[dict[str, Any]]
    bad: tuple[BadRow, ...]


def _credit_rows(rng: np.random.Generator, account_ids: list[str], as_of: dt.date) -> _CreditRows:
    """Top-ups from the launch of tiered pricing to `as_of`: online ones across the tiers
    (about one account in two buys in a month, one in fifteen of them at another price
    than the tier's), a few wires, a batch of event codes redeemed (one twice, one
    late), and refund requests; plus the bad top-ups of `DEMO_BAD_TOP_UPS`."""
    first = dt.datetime.combine(TIERS_FROM, dt.time())
    end = dt.datetime.combine(as_of + dt.timedelta(days=1), dt.time())
    span = int((end - first).total_seconds())

    def when(low: dt.datetime = first, high: dt.datetime = end) -> dt.datetime:
        seconds = int(rng.integers(0, max(1, int((high - low).total_seconds()))))
        return low + dt.timedelta(seconds=seconds)

    rows: list[dict[str, Any]] = []

    def top_up(i: str, account: str, channel: str, at: dt.datetime, **values: Any) -> None:
        rows.append(
            {
                "top_up_id": i,
                "account_id": account,
                "channel": channel,
                "credits": None,
                "amount_paid": None,
                "paid_at": at,
                "code": None,
                **values,
            }
        )

    months = max(1, span // (30 * 86400))
    n = 0
    for account in account_ids:
        for _ in range(int(rng.binomial(months, 0.5))):
            n += 1
            size = int(rng.choice(_TOP_UP_SIZES))
            at = when()
            day = (at.date() - dt.date(1970, 1, 1)).days
            cents = int(price_cents(DEMO_TIERS, [size * 10_000], [day])[0])
            if rng.random() < 1 / 15:
                cents += 100  # paid one more unit of money than the tier's price: an exception
            top_up(
                f"tu-{n:06d}",
                account,
                "online",
                at,
                credits=Decimal(size),
                amount_paid=Decimal(cents).scaleb(-2),
            )
    for k, account in enumerate(account_ids[:: max(1, len(account_ids) // 4)]):
        top_up(
            f"tu-wire-{k + 1:02d}", account, "wire", when(), amount_paid=Decimal(int(rng.integers(500, 3000)))
        )
    redeem_by = first + dt.timedelta(days=120)
    codes = [
        {
            "code": f"EVT-{k + 1:03d}",
            "batch_id": "launch-event",
            "credits": Decimal(50),
            "redeem_by": redeem_by,
            "valid_days": 60,
        }
        for k in range(12)
    ]
    redeemers = account_ids[:10]
    for k, account in enumerate(redeemers):
        top_up(
            f"tu-code-{k + 1:02d}",
            account,
            "code",
            when(first, first + dt.timedelta(days=100)),
            code=codes[k]["code"],
        )
    refunds = [
        {
            "request_id": f"rr-{k + 1:03d}",
            "account_id": account,
            "requested_at": when(first + dt.timedelta(days=60)),
        }
        for k, account in enumerate(account_ids[1 :: max(1, len(account_ids) // 3)])
    ]
    top_up("tu-bad-01", "acct-unknown", "online", when(), credits=Decimal(100), amount_paid=Decimal("10.00"))
    top_up("tu-bad-02", account_ids[0], "wire", when(), amount_paid=Decimal("9.99"))
    top_up(
        "tu-bad-03", account_ids[-1], "code", when(first + dt.timedelta(days=110), redeem_by), code="EVT-001"
    )
    top_up("tu-bad-04", account_ids[-1], "code", redeem_by + dt.timedelta(days=3), code="EVT-012")
    reasons = {row_id: reason for _, row_id, reason in DEMO_BAD_TOP_UPS}
    bad = tuple(
        BadRow("top_ups", r["top_up_id"], r["account_id"], reasons[r["top_up_id"]])
        for r in rows
        if r["top_up_id"] in reasons
    )
    return _CreditRows(rows, codes, refunds, bad)


def _bad_rows(
    rng: np.random.Generator, plan: list[_Project], as_of: dt.date, end_us: int
) -> tuple[tuple[BadRow, ...], list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """One bad row of each kind, on the role projects; all dated on or after E."""
    role = {p.role: p for p in plan if p.role is not None}
    effective_us = _us(EFFECTIVE_DATE)
    after_e = (effective_us, end_us)
    days_after_e = (as_of - EFFECTIVE_DATE).days

    def when() -> dt.datetime:
        return _dt(_uniform_us(rng, *after_e))

    def day(first_offset: int) -> dt.date:
        return EFFECTIVE_DATE + dt.timedelta(int(rng.integers(first_offset, days_after_e + 1)))

    plain_a, plain_b = role[_ROLE_PLAIN_A], role[_ROLE_PLAIN_B]
    late, deleted, published = role[_ROLE_LATE], role[_ROLE_DELETED], role[_ROLE_PUBLISHED]
    deleted_at = deleted.events[0][0]
    published_at = published.events[0][0]
    # The published project's bad rows fall on days it is surely published.
    first_published_offset = max(1, (_date(published_at) - EFFECTIVE_DATE).days + 1)

    events = [
        ("evt-bad-01", plain_a.project_id, when(), "restored"),
        ("evt-bad-02", deleted.project_id, _dt(deleted_at + 2 * _DAY_US), "archived"),
        ("evt-bad-03", late.project_id, _dt(late.created_us - _DAY_US), "archived"),
        ("evt-bad-04", plain_b.project_id, when(), "renamed"),
        ("evt-bad-05", UNKNOWN_PROJECT_ID, when(), "archived"),
    ]
    compute = [
        ("cu-bad-01", UNKNOWN_PROJECT_ID, when(), _from_ten_thousandths(15_000)),
        ("cu-bad-02", plain_b.project_id, when(), None),
    ]
    cloud = [
        ("cl-bad-01", plain_a.project_id, day(0), "page_views", Decimal(120)),
        (
            "cl-bad-02",
            published.project_id,
            day(first_published_offset),
            "bandwidth_gb",
            _from_ten_thousandths(-15_000),
        ),
        (
            "cl-bad-03",
            published.project_id,
            day(first_published_offset),
            "cpu_hours",
            _from_ten_thousandths(20_000),
        ),
        ("cl-bad-04", published.project_id, day(first_published_offset), "data_storage_gb", None),
    ]
    reasons = {row_id: reason for _, row_id, reason in DEMO_BAD_ROWS}
    bad = tuple(
        BadRow(table, row[0], row[1], reasons[row[0]])
        for table, rows in (
            ("compute_usage", compute),
            ("project_events", events),
            ("cloud_usage", cloud),
        )
        for row in rows
    )
    return (
        bad,
        [{"event_id": i, "project_id": p, "occurred_at": t, "kind": k} for i, p, t, k in events],
        [{"usage_id": i, "project_id": p, "occurred_at": t, "credits": c} for i, p, t, c in compute],
        [
            {"usage_id": i, "project_id": p, "usage_date": d, "metric": m, "quantity": q}
            for i, p, d, m, q in cloud
        ],
    )


# --------------------------------------------------------------------------- bulk

_BULK_CHUNK_ROWS = 200_000


def _amount_strings(low: int, high: int) -> np.ndarray:
    """Lookup table: index `v - low` holds the exact text of `v` ten-thousandths."""
    return np.array(
        [f"{'-' if v < 0 else ''}{abs(v) // 10_000}.{abs(v) % 10_000:04d}" for v in range(low, high + 1)],
        dtype=object,
    )


def _ten_thousandths_text(values: np.ndarray) -> list[str]:
    """Exact texts of non-negative integer ten-thousandths: 1250 -> '0.1250'."""
    return [f"{v // 10_000}.{v % 10_000:04d}" for v in values.tolist()]


def _timestamp_strings(us: np.ndarray) -> list[str]:
    """'YYYY-MM-DD HH:MM:SS.ffffff' texts of microsecond instants, as SQLAlchemy writes."""
    text = np.datetime_as_string(us.astype("datetime64[us]"), unit="us")
    text.view(np.uint32).reshape(len(text), -1)[:, 10] = ord(" ")  # the 'T' separator
    return text.tolist()  # type: ignore[no-any-return]


def _ids(prefix: str, start: int, stop: int, width: int) -> list[str]:
    return [f"{prefix}{n:0{width}d}" for n in range(start, stop)]


class _Writer:
    """Rows into one transaction: executemany of tuples on SQLite, COPY on PostgreSQL."""

    def __init__(self, engine: Engine) -> None:
        self.dialect = engine.dialect.name
        if self.dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"generate_bulk supports sqlite and postgresql, not {self.dialect}")
        if self.dialect == "postgresql" and engine.dialect.driver != "psycopg":
            raise ValueError("generate_bulk on PostgreSQL needs the psycopg (3) driver")
        self.raw = engine.raw_connection()
        self.cursor: Any = self.raw.cursor()

    def write(self, table: str, columns: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
        cols = ", ".join(columns)
        if self.dialect == "sqlite":
            marks = ", ".join("?" for _ in columns)
            self.cursor.executemany(f"INSERT INTO {table} ({cols}) VALUES ({marks})", rows)
        else:
            with self.cursor.copy(f"COPY {table} ({cols}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)

    def commit(self) -> None:
        self.raw.commit()

    def close(self) -> None:
        self.raw.close()


@dataclass(frozen=True)
class _BulkProjects:
    created: np.ndarray  # microseconds, ascending: project i is the i-th created
    ids: np.ndarray  # project ids (objects)
    account_index: np.ndarray  # project i belongs to account i % n_accounts
    account_ids: np.ndarray


def _bulk_projects(
    rng: np.random.Generator, count: int, per_account: int, low_us: int, high_us: int
) -> _BulkProjects:
    n_accounts = -(-count // per_account)
    created = np.sort(rng.integers(low_us, high_us, size=count, dtype=np.int64))
    index = np.arange(count)
    account_index = index % n_accounts
    number = index // n_accounts + 1
    wa = max(4, len(str(n_accounts)))
    wp = max(2, len(str(int(number.max()))))
    ids = np.array(
        [
            f"prj-{a + 1:0{wa}d}-{k:0{wp}d}"
            for a, k in zip(account_index.tolist(), number.tolist(), strict=True)
        ],
        dtype=object,
    )
    account_ids = np.array([f"acct-{a:0{wa}d}" for a in range(1, n_accounts + 1)], dtype=object)
    return _BulkProjects(created, ids, account_index, account_ids)


def _write_bulk_accounts_and_projects(rng: np.random.Generator, writer: _Writer, bp: _BulkProjects) -> None:
    n_accounts = len(bp.account_ids)
    # An account's first project is project `a`; the account opened shortly before it.
    opened = bp.created[:n_accounts] - rng.integers(_HOUR_US, 20 * _DAY_US, size=n_accounts)
    kinds = np.where(rng.random(n_accounts) < 0.3, "team", "personal").tolist()
    for start in range(0, n_accounts, _BULK_CHUNK_ROWS):
        stop = min(start + _BULK_CHUNK_ROWS, n_accounts)
        writer.write(
            "accounts",
            ("account_id", "kind", "name", "created_at"),
            list(
                zip(
                    bp.account_ids[start:stop].tolist(),
                    kinds[start:stop],
                    [f"Account {a}" for a in range(start + 1, stop + 1)],
                    _timestamp_strings(opened[start:stop]),
                    strict=True,
                )
            ),
        )
    for start in range(0, len(bp.ids), _BULK_CHUNK_ROWS):
        stop = min(start + _BULK_CHUNK_ROWS, len(bp.ids))
        writer.write(
            "projects",
            ("project_id", "account_id", "name", "created_at"),
            list(
                zip(
                    bp.ids[start:stop].tolist(),
                    bp.account_ids[bp.account_index[start:stop]].tolist(),
                    [f"project {n}" for n in range(start + 1, stop + 1)],
                    _timestamp_strings(bp.created[start:stop]),
                    strict=True,
                )
            ),
        )


def _write_bulk_events(
    rng: np.random.Generator,
    writer: _Writer,
    bp: _BulkProjects,
    end_us: int,
    published_share: float,
) -> tuple[int, np.ndarray, np.ndarray]:
    """Disjoint groups with simple valid histories: 8% archived (a third restored
    later), 3% deleted, `published_share` published. Returns the event count and
    the published projects with their publish instants."""
    count = len(bp.created)
    left = end_us - bp.created  # time from creation to the end of the data
    group = rng.random(count)
    archived = group < 0.08
    deleted = (group >= 0.08) & (group < 0.11)
    published = (group >= 0.11) & (group < 0.11 + published_share)
    restored = archived & (rng.random(count) < 1 / 3)
    archive_at = bp.created + (rng.random(count) * left).astype(np.int64)
    after_archive = np.maximum(end_us - archive_at - 1, 0)
    restore_at = archive_at + 1 + (rng.random(count) * after_archive).astype(np.int64)
    publish_at = bp.created + np.minimum(rng.integers(_HOUR_US, 3 * _DAY_US, size=count), left - 1)

    index = np.arange(count)
    who = np.concatenate([index[archived], index[restored], index[deleted], index[published]])
    when = np.concatenate(
        [archive_at[archived], restore_at[restored], archive_at[deleted], publish_at[published]]
    )
    kind = np.repeat(
        np.array(["archived", "restored", "deleted", "published"], dtype=object),
        [int(archived.sum()), int(restored.sum()), int(deleted.sum()), int(published.sum())],
    )
    order = np.lexsort((who, when))  # by time; stable, so an archive precedes its restore
    who, when, kind = who[order], when[order], kind[order]
    width = max(6, len(str(len(when))))
    for start in range(0, len(when), _BULK_CHUNK_ROWS):
        stop = min(start + _BULK_CHUNK_ROWS, len(when))
        writer.write(
            "project_events",
            ("event_id", "project_id", "occurred_at", "kind"),
            list(
                zip(
                    _ids("evt-", start + 1, stop + 1, width),
                    bp.ids[who[start:stop]].tolist(),
                    _timestamp_strings(when[start:stop]),
                    kind[start:stop].tolist(),
                    strict=True,
                )
            ),
        )
    return len(when), index[published], publish_at[published]


def _write_bulk_compute(
    rng: np.random.Generator,
    writer: _Writer,
    bp: _BulkProjects,
    bounds: list[tuple[int, int]],
    rows_per_month: int,
) -> int:
    """`rows_per_month` rows a month on projects created by then; 0.1% are reversals."""
    credit_text = _amount_strings(-_MAX_CREDITS, _MAX_CREDITS)
    width = max(7, len(str(rows_per_month * len(bounds))))
    written = 0
    for m_start, m_end in bounds:
        eligible = int(np.searchsorted(bp.created, m_end - _HOUR_US))
        if eligible == 0 or rows_per_month == 0:
            continue
        who = rng.integers(0, eligible, size=rows_per_month)
        begin = np.maximum(bp.created[who], m_start)
        at = begin + (rng.random(rows_per_month) * (m_end - begin)).astype(np.int64)
        amount = rng.integers(_MIN_CREDITS, _MAX_CREDITS + 1, size=rows_per_month)
        amount[rng.random(rows_per_month) < 0.001] *= -1
        order = np.argsort(at, kind="stable")
        who, at, amount = who[order], at[order], amount[order]
        for start in range(0, rows_per_month, _BULK_CHUNK_ROWS):
            stop = min(start + _BULK_CHUNK_ROWS, rows_per_month)
            writer.write(
                "compute_usage",
                ("usage_id", "project_id", "occurred_at", "credits"),
                list(
                    zip(
                        _ids("cu-", written + start + 1, written + stop + 1, width),
                        bp.ids[who[start:stop]].tolist(),
                        _timestamp_strings(at[start:stop]),
                        credit_text[amount[start:stop] + _MAX_CREDITS].tolist(),
                        strict=True,
                    )
                ),
            )
        written += rows_per_month
    return written


def _write_bulk_cloud(
    rng: np.random.Generator,
    writer: _Writer,
    bp: _BulkProjects,
    bounds: list[tuple[int, int]],
    *,
    published: np.ndarray,
    publish_at: np.ndarray,
) -> int:
    """One row per metric and day for published projects on their published days."""
    publish_day = publish_at // _DAY_US  # days since the epoch
    views_a_day = rng.lognormal(np.log(300), 1.0, size=len(published))
    mb_per_view = rng.uniform(0.3, 3.0, size=len(published))
    storage = rng.integers(500, 50_000, size=len(published))
    domains = rng.choice(3, p=[0.4, 0.45, 0.15], size=len(published))
    written = 0
    for m_start, m_end in bounds:
        for day in range(m_start // _DAY_US, m_end // _DAY_US):
            on = np.flatnonzero(publish_day <= day)
            if len(on) == 0:
                continue
            views = rng.poisson(views_a_day[on])
            bandwidth = np.rint(views * mb_per_view[on] / 1024 * 10_000).astype(np.int64)
            stored = storage[on] + 60 * (day - publish_day[on]) + rng.integers(0, 50, size=len(on))
            quantities = (
                [str(v) for v in views.tolist()],
                _ten_thousandths_text(bandwidth),
                _ten_thousandths_text(stored),
                [str(v) for v in domains[on].tolist()],
            )
            date_text = str(np.datetime64(day, "D"))
            pids = bp.ids[published[on]].tolist()
            rows = [
                (f"cl-{written + 1 + k * len(on) + j:08d}", pid, date_text, metric, quantity)
                for k, metric in enumerate(METRICS)
                for j, (pid, quantity) in enumerate(zip(pids, quantities[k], strict=True))
            ]
            writer.write("cloud_usage", ("usage_id", "project_id", "usage_date", "metric", "quantity"), rows)
            written += len(rows)
    return written


def generate_bulk(
    engine: Engine,
    *,
    projects: int,
    usage_rows_per_month: int,
    months: Sequence[tuple[int, int]],
    seed: int = 7,
    projects_per_account: int = 8,
    published_share: float = 0.01,
    top_ups_per_account_month: float = 0.0,
) -> BulkSummary:
    """Create the source tables and fill them fast with benchmark volumes.

    `projects` projects (about `projects_per_account` per account) are created
    from 270 days before the first of `months` (a list of (year, month)) to the
    end of the last one; about 8% are archived (a third of those restored
    later), 3% deleted and `published_share` published, with one `cloud_usage`
    row per metric and day while published within `months`. Each month gets
    `usage_rows_per_month` compute rows (0.0125..3.5 credits; 0.1% negative
    reversals) on projects that exist by then; each account buys about
    `top_ups_per_account_month` online top-ups a month at the tier prices. No bad
    rows. SQLite or
    PostgreSQL (psycopg) only. Refuses a database whose source tables hold
    rows; the data is written in one transaction.
    """
    if projects < 1 or usage_rows_per_month < 0 or not months:
        raise ValueError("need projects >= 1, usage_rows_per_month >= 0 and at least one month")
    if not 0 <= published_share <= 0.89:
        raise ValueError(f"published_share must be within [0, 0.89], got {published_share}")
    with engine.begin() as conn:
        _prepare(conn)
    rng = np.random.default_rng(seed)
    bounds = [
        (_us(_month_start(y, m)), _us(_month_start(*_next_month(y, m)))) for y, m in sorted(set(months))
    ]
    end_us = bounds[-1][1]
    bp = _bulk_projects(rng, projects, projects_per_account, bounds[0][0] - 270 * _DAY_US, end_us - _DAY_US)

    writer = _Writer(engine)
    try:
        _write_bulk_accounts_and_projects(rng, writer, bp)
        n_events, published, publish_at = _write_bulk_events(rng, writer, bp, end_us, published_share)
        n_compute = _write_bulk_compute(rng, writer, bp, bounds, usage_rows_per_month)
        n_cloud = _write_bulk_cloud(rng, writer, bp, bounds, published=published, publish_at=publish_at)
        n_top_ups = _write_bulk_top_ups(rng, writer, bp, bounds, top_ups_per_account_month)
        writer.commit()
    finally:
        writer.close()
    return BulkSummary(
        seed=seed,
        accounts=len(bp.account_ids),
        projects=projects,
        project_events=n_events,
        compute_usage=n_compute,
        cloud_usage=n_cloud,
        top_ups=n_top_ups,
    )


def _write_bulk_top_ups(
    rng: np.random.Generator,
    writer: _Writer,
    bp: _BulkProjects,
    bounds: list[tuple[int, int]],
    per_account_month: float,
) -> int:
    """Online top-ups: a Poisson number per account and month, sizes across the tiers."""
    if per_account_month <= 0:
        return 0
    accounts = len(bp.account_ids)
    written = 0
    sizes = np.array(_TOP_UP_SIZES, dtype=np.int64)
    for m_start, m_end in bounds:
        counts = rng.poisson(per_account_month, size=accounts)
        who = np.repeat(np.arange(accounts), counts)
        n = len(who)
        at = m_start + (rng.random(n) * (m_end - m_start)).astype(np.int64)
        size = sizes[rng.integers(0, len(sizes), size=n)]
        days = at // _DAY_US
        cents = price_cents(DEMO_TIERS, size * 10_000, days)
        rows = [
            (
                f"tu-{written + i + 1:09d}",
                acct,
                "online",
                str(int(c)),
                f"{int(m) // 100}.{int(m) % 100:02d}",
                t,
            )
            for i, (acct, c, m, t) in enumerate(
                zip(
                    bp.account_ids[who].tolist(),
                    size.tolist(),
                    cents.tolist(),
                    _timestamp_strings(at),
                    strict=True,
                )
            )
        ]
        for start in range(0, n, _BULK_CHUNK_ROWS):
            writer.write(
                "top_ups",
                ("top_up_id", "account_id", "channel", "credits", "amount_paid", "paid_at"),
                rows[start : start + _BULK_CHUNK_ROWS],
            )
        written += n
    return written
