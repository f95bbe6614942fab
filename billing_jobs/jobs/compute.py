"""Load -> rules for one chunk of accounts and one billing month.

The one place where source data meets the rules: nightly, month-end, previews
and `explain` all call `compute_chunk`, so they cannot disagree.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from functools import cached_property, partial
from zoneinfo import ZoneInfo

import numpy as np
from sqlalchemy import Connection, Engine

from billing_jobs.db import reads
from billing_jobs.db.credit_reads import read_compute_days
from billing_jobs.db.sql import Chunk
from billing_jobs.frames import pd
from billing_jobs.phases import phase, rest
from billing_jobs.rules import periods
from billing_jobs.rules.calendar import (
    Month,
    day_bounds_utc,
    day_from_number,
    day_number,
    local_day_numbers,
)
from billing_jobs.rules.cloud_fee import cloud_fees, published_days
from billing_jobs.rules.invoice import STORAGE_FEE, month_lines, storage_totals, unit_prices
from billing_jobs.rules.lifecycle import Lifecycle, build_lifecycle
from billing_jobs.rules.money import UNITS_PER_CREDIT, to_units
from billing_jobs.rules.storage_fee import StorageRules, charged_runs, storage_charges, storage_days
from billing_jobs.rules.waiver import waiver_refunds
from billing_jobs.settings import Settings

REJECT_COLUMNS = ["source_table", "source_id", "reason", "project_id", "period", "detail"]


def storage_rules(settings: Settings) -> StorageRules:
    return StorageRules.from_values(
        effective_from=settings.effective_from,
        credits_per_day=settings.credits_per_day,
        monthly_cap=settings.monthly_cap,
        new_project_free_months=settings.new_project_free_months,
        new_project_promo_until=settings.new_project_promo_until,
        legacy_free_months=settings.legacy_free_months,
    )


def waiver_threshold_units(settings: Settings) -> int | None:
    t = settings.active_waiver_compute_threshold
    return None if t is None else to_units(t)


@dataclass(frozen=True)
class SourceTally:
    """What chunks' usage reads of a whole month saw: every row of their projects in
    the month (`compute`, `cloud`), usable or not, and the projects with a row that
    cannot count whatever their state (a bad amount, an unknown metric). Summed over
    every chunk of a run, it tells `source_rejects` where the month's bad rows are:
    when the month holds no more rows than the chunks saw, none is of an unknown
    project, and the rows with bad amounts are those of the projects named."""

    compute: int = 0
    cloud: int = 0
    compute_unusable: tuple[str, ...] = ()
    cloud_unusable: tuple[str, ...] = ()

    def __add__(self, other: SourceTally) -> SourceTally:
        return SourceTally(
            self.compute + other.compute,
            self.cloud + other.cloud,
            self.compute_unusable + other.compute_unusable,
            self.cloud_unusable + other.cloud_unusable,
        )


@dataclass
class ChunkResult:
    """Everything computed for one chunk and one month (days first..last)."""

    projects: pd.DataFrame  # project_id, account_id, created_at
    lifecycle: Lifecycle
    storage: pd.DataFrame  # every active day of the month: project_id, day, status, amount_units
    cloud: pd.DataFrame  # project_id, day, metric, line_type, quantity_units, amount_units
    storage_charged: pd.DataFrame  # charged days first..storage_last: project_id, day, amount_units
    accounts: pd.Series  # each project's account, by project_id
    last_day: int  # the last day of the charges but the storage fee's (a day number)
    compute: pd.DataFrame | None  # project_id, compute_units (month-end only)
    compute_days: pd.DataFrame | None  # account_id, day, compute_units (month-end only)
    refunds: pd.DataFrame | None  # project_id, amount_units, compute_units (month-end only)
    lines: pd.DataFrame | None  # invoice lines for the month (month-end only)
    rejects: pd.DataFrame  # rows of this chunk rejected by the rules
    tally: SourceTally | None = None  # what the usage reads saw (whole month only)

    @cached_property
    def periods(self) -> pd.DataFrame:
        """The charges in the canonical periods the store holds (`rules.periods`): the
        storage fee as runs made from its charged days directly (they come grouped by
        project and in day order), the cloud fees in the month form."""
        runs = charged_runs(self.storage_charged)
        first = runs["first_day"].to_numpy(dtype=np.int64)
        last = runs["last_day"].to_numpy(dtype=np.int64)
        storage = pd.DataFrame(
            {
                "project_id": runs["project_id"].to_numpy(dtype=object),
                "charge_type": STORAGE_FEE,
                "first_day": first,
                "last_day": last,
                "days": last - first + 1,
                "account_id": self._account_of(runs["project_id"]),
                "quantity_units": np.full(len(runs), UNITS_PER_CREDIT, dtype=np.int64),
                "amount_units": runs["amount_units"].to_numpy(dtype=np.int64),
                "daily": np.full(len(runs), None, dtype=object),
            }
        )
        return periods.joined([storage, periods.months_of_days(self._cloud_days())])

    @cached_property
    def charges(self) -> pd.DataFrame:
        """Every daily charge: the storage fee's days first..storage_last, the cloud fees'
        first..last (`rules.periods.DAY_COLUMNS`)."""
        charged = self.storage_charged
        storage = pd.DataFrame(
            {
                "project_id": charged["project_id"].to_numpy(dtype=object),
                "account_id": self._account_of(charged["project_id"]),
                "charge_type": STORAGE_FEE,
                "day": charged["day"].to_numpy(dtype=np.int64),
                "quantity_units": np.full(len(charged), UNITS_PER_CREDIT, dtype=np.int64),
                "amount_units": charged["amount_units"].to_numpy(dtype=np.int64),
            }
        )
        return pd.concat([storage, self._cloud_days()], ignore_index=True)[periods.DAY_COLUMNS]

    def counts(self) -> dict[str, int]:
        """The run summary's counts of the charges of days up to `last_day`."""
        charged = self.storage_charged
        storage = charged.loc[charged["day"] <= self.last_day, "amount_units"]
        return {
            "storage_charges": len(storage),
            "storage_units": int(storage.sum()),
            "cloud_charges": len(self.cloud),
            "cloud_units": int(self.cloud["amount_units"].sum()),
        }

    def _account_of(self, project_ids: pd.Series) -> np.ndarray:
        found: np.ndarray = self.accounts.reindex(project_ids).to_numpy(dtype=object)
        return found

    def _cloud_days(self) -> pd.DataFrame:
        cloud = self.cloud
        return pd.DataFrame(
            {
                "project_id": cloud["project_id"].to_numpy(dtype=object),
                "account_id": self._account_of(cloud["project_id"]),
                "charge_type": cloud["line_type"].to_numpy(dtype=object),
                "day": cloud["day"].to_numpy(dtype=np.int64),
                "quantity_units": cloud["quantity_units"].to_numpy(dtype=np.int64),
                "amount_units": cloud["amount_units"].to_numpy(dtype=np.int64),
            }
        )


def _period_of_days(days: np.ndarray) -> np.ndarray:
    months = np.asarray(days, dtype=np.int64).astype("datetime64[D]").astype("datetime64[M]")
    return np.datetime_as_string(months, unit="M").astype(object)


def compute_chunk(
    conn: Connection,
    settings: Settings,
    month: Month,
    chunk: Chunk,
    *,
    first: date | None = None,
    last: date | None = None,
    whole_month: bool = True,
    storage_last: date | None = None,
    phases: dict[str, float] | None = None,
) -> ChunkResult:
    """Recompute billing for the chunk's projects from the source tables.

    Every read is of the chunk's accounts alone (aggregated by the database), so
    what this holds is bounded by the chunk, not by the platform. Storage days are
    always computed from the start of the month (the cap counts from day one);
    charges are returned for `first..last` (default: the month), the storage fee's
    for `first..storage_last` when that is later (what the lifecycle known now gives
    the days not billed yet). With `whole_month`, compute totals, waiver refunds and
    invoice lines too. phases: where the time goes (`billing_jobs.phases`): the reads,
    and "rules" for the rest.
    """
    with rest(phases, "rules"):
        return _compute_chunk(conn, settings, month, chunk, first, last, whole_month, storage_last, phases)


def _compute_chunk(
    conn: Connection,
    settings: Settings,
    month: Month,
    chunk: Chunk,
    first: date | None,
    last: date | None,
    whole_month: bool,
    storage_last: date | None,
    phases: dict[str, float] | None,
) -> ChunkResult:
    settings = settings.for_month(month.first_day)  # prices and promotions in force that month
    zone = ZoneInfo(settings.timezone)
    first = first or month.first_day
    last = last or month.last_day
    with phase(phases, "read"):
        projects = reads.read_projects(conn, chunk)
        events = reads.read_events(conn, chunk)
    lifecycle = build_lifecycle(projects, events)
    intervals = lifecycle.intervals
    active = intervals.loc[intervals["state"] == "active"]
    published = intervals.loc[intervals["state"] == "published"]
    rules = storage_rules(settings)

    storage = storage_days(projects, active, month, zone, rules)
    lo, hi = day_number(first), day_number(last)
    charged = storage_charges(storage)
    stored_through = max(hi, day_number(storage_last)) if storage_last else hi
    charged_ahead = charged.loc[(charged["day"] >= lo) & (charged["day"] <= stored_through)]
    charged = charged_ahead.loc[charged_ahead["day"] <= hi]

    with phase(phases, "cloud_read"):
        cloud_read = reads.read_cloud_tallied(conn, first, last, chunk)
    usage = cloud_read.frame
    pub_days = published_days(published, lo, hi, zone)
    cloud, not_billable = cloud_fees(usage, pub_days, rules.effective_day, settings.cloud_prices)

    accounts = pd.Series(
        projects["account_id"].to_numpy(dtype=object),
        index=projects["project_id"].to_numpy(dtype=object),
    )

    rejects = [_event_rejects(lifecycle.rejected, zone)]
    if len(not_billable):
        with phase(phases, "cloud_read"):
            rows = reads.read_cloud_rows(conn, not_billable, first, last)
        rows = rows.merge(not_billable, on=["project_id", "day", "metric"])
        rejects.append(_cloud_rejects(rows))

    compute = compute_days = refunds = lines = tally = None
    if whole_month:
        # One read of the month's compute: per project and billing day, from which both
        # the waiver's totals and the credits ledger's compute per account and day come.
        with phase(phases, "compute_read"):
            days = read_compute_days(conn, month.first_day, month.last_day, zone, chunk)
        compute = days.per_project()
        compute_days = days.per_account_day()
        if (first, last) == (month.first_day, month.last_day):
            tally = SourceTally(days.seen, cloud_read.seen, days.unusable, cloud_read.unusable)
        # The waiver refunds what is charged: the month, or its days so far in a preview.
        totals = storage_totals(charged)  # summed as the rows come, a project after another
        refunds = waiver_refunds(totals, compute, waiver_threshold_units(settings))
        prices = unit_prices(settings.credits_per_day, settings.cloud_prices)
        lines = month_lines(charged, refunds, cloud, accounts, prices, totals=totals)

    return ChunkResult(
        projects=projects,
        lifecycle=lifecycle,
        storage=storage,
        cloud=cloud,
        storage_charged=charged_ahead.reset_index(drop=True),
        accounts=accounts,
        last_day=hi,
        compute=compute,
        compute_days=compute_days,
        refunds=refunds,
        lines=lines,
        rejects=pd.concat(rejects, ignore_index=True),
        tally=tally,
    )


def _event_rejects(rejected: pd.DataFrame, zone: ZoneInfo) -> pd.DataFrame:
    if rejected.empty:
        return pd.DataFrame(columns=REJECT_COLUMNS)
    days = local_day_numbers(rejected["occurred_at"], zone)
    return pd.DataFrame(
        {
            "source_table": "project_events",
            "source_id": rejected["event_id"].to_numpy(dtype=object),
            "reason": rejected["reason"].to_numpy(dtype=object),
            "project_id": rejected["project_id"].to_numpy(dtype=object),
            "period": _period_of_days(days),
            "detail": [
                f"kind={k} occurred_at={t}"
                for k, t in zip(rejected["kind"], rejected["occurred_at"], strict=True)
            ],
        }
    )


def _cloud_rejects(rows: pd.DataFrame) -> pd.DataFrame:
    if rows.empty:
        return pd.DataFrame(columns=REJECT_COLUMNS)
    dates = [day_from_number(d).isoformat() for d in rows["day"]]
    return pd.DataFrame(
        {
            "source_table": "cloud_usage",
            "source_id": rows["usage_id"].to_numpy(dtype=object),
            "reason": rows["reason"].to_numpy(dtype=object),
            "project_id": rows["project_id"].to_numpy(dtype=object),
            "period": _period_of_days(rows["day"].to_numpy()),
            "detail": [
                f"usage_date={d} metric={m} quantity={_text(v)}"
                for d, m, v in zip(dates, rows["metric"], rows["value"], strict=True)
            ],
        }
    )


def _text(value: object) -> str:
    return "NULL" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def source_rejects(
    conn: Connection, settings: Settings, first: date, last: date, tally: SourceTally | None = None
) -> pd.DataFrame:
    """Usage rows of days first..last that the database can tell are bad, any project.

    Bounded by the number of bad rows: the database filters, only rejects come back.
    Without `tally`, two scans of the days' usage (the rows with bad amounts, the
    projects named that do not exist). With the tally of every chunk of a run that
    read the same days, after those reads: the days' rows counted through the time
    indexes; a usage table holding no more rows than the chunks saw holds none of an
    unknown project (rows are only ever added), and its bad rows are those of the
    projects the tally names, read through the project index. A table holding more
    (rows of unknown projects, or added since) is searched for unknown projects.
    """
    zone = ZoneInfo(settings.timezone)
    start, end = day_bounds_utc(first, last, zone)
    if tally is None:
        compute = reads.read_compute_rejects(conn, start, end)
        cloud = reads.read_cloud_rejects(conn, first, last)
    else:
        compute_rows, cloud_rows = reads.usage_rows(conn, start, end, first, last)
        compute = reads.read_compute_rejects(
            conn, start, end, sorted(set(tally.compute_unusable)), unknown=compute_rows != tally.compute
        )
        cloud = reads.read_cloud_rejects(
            conn, first, last, sorted(set(tally.cloud_unusable)), unknown=cloud_rows != tally.cloud
        )
    parts = []
    if len(compute):
        days = local_day_numbers(compute["occurred_at"], zone)
        parts.append(
            pd.DataFrame(
                {
                    "source_table": "compute_usage",
                    "source_id": compute["usage_id"].to_numpy(dtype=object),
                    "reason": compute["reason"].to_numpy(dtype=object),
                    "project_id": compute["project_id"].to_numpy(dtype=object),
                    "period": _period_of_days(days),
                    "detail": [
                        f"occurred_at={t} credits={_text(v)}"
                        for t, v in zip(compute["occurred_at"], compute["value"], strict=True)
                    ],
                }
            )
        )
    if len(cloud):
        parts.append(_cloud_rejects(cloud))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=REJECT_COLUMNS)


def orphan_event_rejects(conn: Connection, settings: Settings) -> pd.DataFrame:
    orphans = reads.read_orphan_events(conn)
    if orphans.empty:
        return pd.DataFrame(columns=REJECT_COLUMNS)
    orphans = orphans.assign(reason="unknown_project")
    return _event_rejects(orphans, ZoneInfo(settings.timezone))


def month_days(month: Month) -> list[date]:
    return [month.first_day + timedelta(days=i) for i in range(month.days)]


def platform_rejects(
    conn: Connection, settings: Settings, first: date, last: date, tally: SourceTally | None = None
) -> pd.DataFrame:
    """Rows of days first..last rejected whatever the chunk: bad amounts, unknown
    projects, events of unknown projects. Without `tally`, platform-wide scans, so a
    job runs them beside its chunks (`InBackground`), not before them; with it, after
    them (`source_rejects`)."""
    return pd.concat(
        [source_rejects(conn, settings, first, last, tally), orphan_event_rejects(conn, settings)],
        ignore_index=True,
    )


class InBackground:
    """`work(conn)` on a thread of its own, on a connection of its own (the database
    does the work while this process runs the chunks); `result()` waits for it and
    raises what it raised.

    Used as a context manager: a run that fails before it asked for the result
    cancels the statement in flight and waits for the thread, so the side read's
    connection is closed before the run's engine is disposed (none is left open
    for the garbage collector)."""

    STOP_SECONDS = 30.0

    def __init__(self, engine: Engine, work: Callable[[Connection], pd.DataFrame]) -> None:
        self._engine = engine
        self._work = work
        self._value: pd.DataFrame | None = None
        self._error: BaseException | None = None
        self._dbapi: object | None = None
        self._stopping = threading.Event()
        self._guard = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="billing-side-read", daemon=True)
        self._thread.start()

    def __enter__(self) -> InBackground:
        return self

    def __exit__(self, kind: object, value: object, tb: object) -> None:
        if self._thread.is_alive():
            self.stop()

    def _run(self) -> None:
        try:
            with self._engine.connect() as conn:
                with self._guard:
                    self._dbapi = conn.connection.dbapi_connection
                if self._stopping.is_set():
                    return
                self._value = self._work(conn)
        except BaseException as exc:  # handed to result(), in the job's own thread
            self._error = exc
        finally:
            with self._guard:
                self._dbapi = None

    def stop(self) -> None:
        """Cancel the statement in flight and wait for the thread (its connection closed)."""
        self._stopping.set()
        deadline = time.monotonic() + self.STOP_SECONDS
        while self._thread.is_alive() and time.monotonic() < deadline:
            with self._guard:  # again until it ends: a cancel before a statement began is lost
                if self._dbapi is not None:
                    _cancel(self._dbapi)
            self._thread.join(0.2)

    def result(self) -> pd.DataFrame:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._value is not None, "a finished read has its value"
        return self._value


def _cancel(dbapi: object) -> None:
    """Interrupt what a DB-API connection runs, from another thread (psycopg: a cancel
    request to the server; sqlite3: `interrupt()`)."""
    for name in ("cancel_safe", "interrupt", "cancel"):
        method = getattr(dbapi, name, None)
        if method is not None:
            with contextlib.suppress(Exception):  # the statement ended meanwhile
                method()
            return


class MonthRejects:
    """The usage rows of a month-end's month rejected whatever the chunk (`platform_rejects`).

    A run whose chunks read the whole month for every account (`tallied`) adds up what
    its chunks' usage reads saw (`add`) and, after them, finds the bad rows from that
    (`source_rejects` with the tally): no second scan of the month's usage. A shard, or
    a preview that stops before the month's end, scans the month beside its chunks
    (`InBackground`). Used as a context manager, as `InBackground`."""

    def __init__(self, engine: Engine, settings: Settings, month: Month, *, tallied: bool) -> None:
        self._engine = engine
        self._work = partial(platform_rejects, settings=settings, first=month.first_day, last=month.last_day)
        self._tally: SourceTally | None = SourceTally() if tallied else None
        self._side = None if tallied else InBackground(engine, self._work)

    def __enter__(self) -> MonthRejects:
        return self

    def __exit__(self, kind: object, value: object, tb: object) -> None:
        if self._side is not None:
            self._side.__exit__(kind, value, tb)

    def add(self, tally: SourceTally | None) -> None:
        if self._tally is not None:
            assert tally is not None, "a month-end chunk of a whole month tallies its reads"
            self._tally += tally

    def result(self) -> pd.DataFrame:
        if self._side is not None:
            return self._side.result()
        with self._engine.connect() as conn:
            return self._work(conn, tally=self._tally)
