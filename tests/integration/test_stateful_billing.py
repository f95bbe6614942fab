"""A Hypothesis state machine that drives the real commands, in-process, under a moving
clock: nightly runs (catch-up and `--date`), late compute and cloud usage, back-dated
lifecycle events, new projects, days passing across month ends, first closes and
re-closes of ended months, and repeats of the last command.

After every step the database is checked against the rules (billing-rules.md):

- no project is charged more storage fee in a closed month than the cap (before the
  close, nightly's charges of a month may exceed it after a back-dated event; the
  close corrects them);
- no storage fee before the effective date or inside a project's free window, and no
  cloud fee before the effective date;
- the Active Project Waiver on a closed month's invoices refunds the month's storage
  fee exactly when the project's compute (summed here with Decimal, as the source
  data stood at the month's last close) reaches the threshold;
- a repeated command with the same clock and the same data changes no table;
- after every close or re-close, the sum of the month's invoices (regular and
  adjustments) per account, project and line type equals a fresh computation: a
  `month-end --dry-run` on a second database holding the same source rows and no
  billing tables at all;
- after every close or re-close, the month's stored charge periods, whatever nightly
  runs came before (any days, any order, repeats), are row for row those of a third
  database with the same source rows on which only month-end ran; and stored charges
  never go past the cap, the free windows or the effective date day by day.

Runs on SQLite and (fewer examples) PostgreSQL; both stay well under a minute. A
second test replays pinned steps of the machine that the random search reaches rarely.
"""

from __future__ import annotations

import calendar
import csv
import os
import shutil
import tempfile
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import time_machine
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from pg_server import PgServer
from sqlalchemy import Engine, create_engine, select
from support import CliResult, SourceData, charge_days, run_cli

from billing_jobs.db.billing_tables import billing_metadata, charge_periods, invoice_lines, invoices
from billing_jobs.settings import DEFAULT_CONFIG_TEXT

# The rules' numbers: the defaults of billing-rules.md, written out here so that a
# change of the built-in settings is caught, not followed.
EFFECTIVE = date(2026, 3, 24)
CAP = Decimal(29)
REPRICED_CAP = Decimal(25)
RATE = Decimal(1)
THRESHOLD = Decimal(30)
UNIT = Decimal("0.0001")

MONTHS = ("2026-03", "2026-04", "2026-05", "2026-06", "2026-07")
FIRST_DAY = date(2026, 3, 1)  # late data reaches back to here
LAST_NOW = datetime(2026, 8, 10, 6, 0, tzinfo=UTC)  # the clock stops advancing here
ACCOUNTS = ("acct-a", "acct-b", "acct-c")
MAX_PROJECTS = 5
ENV = {"BILLING_WORKERS": "1"}
SKIP_TABLES = {"billing_runs"}  # a repeated run adds its own run record, nothing else

# (credits, rows): 300 rows of 0.1 reach the threshold exactly (drawn more often, like a
# single 30); 0.0999 and 29.9999 stay just below it; -0.1 is a reversal.
COMPUTE = [("0.1", 300), ("30", 1), ("0.1", 300), ("0.1", 100), ("0.1", 1), ("0.0999", 1), ("5", 1)]
COMPUTE += [("29.9999", 1), ("-0.1", 1), ("12.3456", 1)]
METRICS = ("page_views", "bandwidth_gb", "data_storage_gb", "domains")
EVENT_KINDS = ("archived", "restored", "deleted", "published", "unpublished")


def month_of(day: date) -> str:
    return f"{day:%Y-%m}"


def month_days(month: str) -> list[date]:
    year, mon = (int(x) for x in month.split("-"))
    return [date(year, mon, d) for d in range(1, calendar.monthrange(year, mon)[1] + 1)]


def add_months(day: date, n: int) -> date:
    """Calendar arithmetic that clamps to the month's end (2026-03-31 + 1 = 2026-04-30)."""
    total = day.year * 12 + day.month - 1 + n
    year, mon = divmod(total, 12)
    return date(year, mon + 1, min(day.day, calendar.monthrange(year, mon + 1)[1]))


def free_window(created: date) -> tuple[date, date]:
    """[lo, hi) of a project's free days: its first month (new) or the legacy month."""
    if created >= EFFECTIVE:
        return created, add_months(created, 1)
    return EFFECTIVE, add_months(EFFECTIVE, 1)


def units(value: object) -> Decimal:
    return Decimal(int(value)) * UNIT  # type: ignore[call-overload]


class BillingMachine(RuleBasedStateMachine):
    """One example: a driven database, a mirror of its source rows, and a model of both."""

    # Set by the test: makes an empty database and returns (url, drop).
    new_database: Callable[[], tuple[str, Callable[[], None]]]
    examples_run = 0

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="stateful-billing-"))
        self.url, drop_db = self.new_database()
        self.mirror, drop_mirror = self.new_database()
        # Closes only (no nightly): what month-end alone stores, compared after each close.
        self.closes_only, drop_closes_only = self.new_database()
        self.drops = [drop_db, drop_mirror, drop_closes_only]
        self.engine: Engine = create_engine(self.url)
        self.mirror_engine: Engine = create_engine(self.mirror)
        self.closes_only_engine: Engine = create_engine(self.closes_only)
        self.now = datetime(2026, 3, 20, 6, 0, tzinfo=UTC)
        self.projects: dict[str, tuple[str, datetime]] = {}  # project -> (account, created_at)
        self.compute: list[tuple[str, datetime, Decimal]] = []
        self.closed: dict[str, int] = {}  # month -> compute rows present at its last close
        self.last: tuple[str, ...] | None = None  # the last command, while nothing changed since
        self.version = 0  # source rows inserted so far (in batches)
        self.compared: dict[str, int] = {}  # month -> version at its last comparison
        self.serial = 0

    # --- helpers ------------------------------------------------------------------------

    def next_id(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}-{self.serial:06d}"

    @property
    def today(self) -> date:
        return self.now.date()

    @property
    def naive_now(self) -> datetime:
        return self.now.replace(tzinfo=None)

    def insert(self, build: Callable[[SourceData], object]) -> None:
        """The same source rows into the driven database and its mirrors."""
        for engine in (self.engine, self.mirror_engine, self.closes_only_engine):
            data = SourceData()
            build(data)
            data.write(engine)
        self.last = None
        self.version += 1

    def add_compute(self, pid: str, when: datetime, credits: str, rows: int) -> None:
        ids = [self.next_id("cu") for _ in range(rows)]

        def build(d: SourceData) -> None:
            for usage_id in ids:
                d.compute(pid, when.isoformat(" "), credits, usage_id=usage_id)

        self.insert(build)
        self.compute.extend((pid, when, Decimal(credits)) for _ in range(rows))

    def cli(self, *args: str) -> CliResult:
        with time_machine.travel(self.now, tick=False):
            return run_cli(self.url, *args, env=ENV)

    def command(self, *args: str) -> CliResult:
        result = self.cli(*args)
        assert result.code == 0, f"{args} at {self.now}: exit {result.code}\n{result.stderr[-2000:]}"
        self.last = args
        return result

    def contents(self) -> dict[str, list[tuple[object, ...]]]:
        out = {}
        with self.engine.connect() as conn:
            for table in billing_metadata.sorted_tables:
                if table.name not in SKIP_TABLES:
                    out[table.name] = sorted((tuple(r) for r in conn.execute(select(table))), key=repr)
        return out

    def ended_months(self) -> list[str]:
        return [m for m in MONTHS if month_days(m)[-1] < self.today]

    def open_days(self) -> list[date]:
        """Days from the effective date up to yesterday whose month is not closed (earlier
        days are refused: nothing is billed before the effective date)."""
        first = max(FIRST_DAY, EFFECTIVE)
        return [d for m in MONTHS if m not in self.closed for d in month_days(m) if first <= d < self.today]

    def invoiced(self, month: str) -> dict[tuple[str, str, str], tuple[Decimal, Decimal]]:
        """Sum of the month's finalized invoices per (account, project, line type): (quantity, amount)."""
        il, inv = invoice_lines.c, invoices.c
        out: dict[tuple[str, str, str], tuple[Decimal, Decimal]] = {}
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(il.account_id, il.project_id, il.line_type, il.quantity_units, il.amount_units)
                .join(invoices, inv.invoice_id == il.invoice_id)
                .where(il.period == month, inv.status == "finalized")
            )
            for account, project, line_type, q, a in rows:
                qq, aa = out.get((account, project, line_type), (Decimal(0), Decimal(0)))
                out[(account, project, line_type)] = (qq + units(q), aa + units(a))
        return {k: v for k, v in out.items() if v != (0, 0)}

    def fresh(self, month: str, *settings: str) -> dict[tuple[str, str, str], tuple[Decimal, Decimal]]:
        """What a first close of `month` would write on a database with the same source rows
        (`settings`: `--config FILE`, else the defaults)."""
        output = self.tmp / f"fresh-{month}.csv"
        with time_machine.travel(self.now, tick=False):
            result = run_cli(
                self.mirror,
                *settings,
                "month-end",
                "--month",
                month,
                "--dry-run",
                "--output",
                str(output),
                env=ENV,
            )
        assert result.code == 0, result.stderr[-2000:]
        out: dict[tuple[str, str, str], tuple[Decimal, Decimal]] = {}
        with output.open(newline="", encoding="utf-8") as fh:
            for r in csv.DictReader(fh):
                key = (r["account_id"], r["project_id"], r["line_type"])
                qq, aa = out.get(key, (Decimal(0), Decimal(0)))
                out[key] = (qq + Decimal(r["quantity"]), aa + Decimal(r["amount"]))
        return {k: v for k, v in out.items() if v != (0, 0)}

    def close(self, month: str, *, approval: bool = False) -> None:
        if approval:  # finance's way: drafts held, then approved while they equal a fresh close
            self.command("month-end", "--month", month, "--hold")
            self.command("month-end", "--approve", month)
        else:
            self.command("month-end", "--month", month)
        self.closed[month] = len(self.compute)
        if self.compared.get(month) != self.version:  # else the repeat check covers it
            assert self.invoiced(month) == self.fresh(month), f"{month}: invoices differ from a fresh close"
            self.compared[month] = self.version
            self.same_store_as_a_close_alone(month)

    def same_store_as_a_close_alone(self, month: str) -> None:
        """The month's stored charges, after whatever nightly runs came before the close,
        are the periods a database on which only month-end ran stores: row for row."""
        with time_machine.travel(self.now, tick=False):
            alone = run_cli(self.closes_only, "month-end", "--month", month, "--reprice", env=ENV)
        assert alone.code == 0, alone.stderr[-2000:]
        driven, closes_only = (
            self.stored_periods(self.engine, month),
            self.stored_periods(self.closes_only_engine, month),
        )
        assert driven == closes_only, f"{month}: stored charges differ from those of a close alone"

    @staticmethod
    def stored_periods(engine: Engine, month: str) -> list[tuple[object, ...]]:
        days = month_days(month)
        cp = charge_periods.c
        columns = [cp.project_id, cp.charge_type, cp.first_day, cp.last_day, cp.days, cp.account_id]
        columns += [cp.quantity_units, cp.amount_units]
        with engine.connect() as conn:
            rows = conn.execute(select(*columns).where(cp.first_day.between(days[0], days[-1]))).all()
        return sorted(tuple(r) for r in rows)

    # --- rules --------------------------------------------------------------------------

    @initialize(start=st.integers(35, 85))
    def start(self, start: int) -> None:
        """Three projects at first: legacy, legacy on the eve of the effective date, and new
        on a month's last day (free until the next month's end)."""
        self.now += timedelta(days=start)

        def build(data: SourceData) -> None:
            data.project("p1", created="2025-11-02 10:00", account="acct-a")
            data.project("p2", created="2026-03-23 23:59", account="acct-b")
            data.project("p3", created="2026-03-31 23:00", account="acct-a")
            data.account("acct-c")

        self.insert(build)
        self.projects = {
            "p1": ("acct-a", datetime.fromisoformat("2025-11-02 10:00")),
            "p2": ("acct-b", datetime.fromisoformat("2026-03-23 23:59")),
            "p3": ("acct-a", datetime.fromisoformat("2026-03-31 23:00")),
        }
        BillingMachine.examples_run += 1

    @precondition(lambda self: self.now < LAST_NOW)
    @rule(days=st.integers(1, 31), data=st.data())
    def advance_clock(self, days: int, data: st.DataObject) -> None:
        """Days pass; each project's compute of yesterday's month arrives on time (none, up
        to exactly the waiver threshold, or just below it); then, as the schedule would,
        maybe the nightly catch-up and the first close of every month that has ended."""
        self.now = min(self.now + timedelta(days=days), LAST_NOW)
        self.last = None
        yesterday = self.today - timedelta(days=1)
        for pid in sorted(self.projects):
            goal = data.draw(st.sampled_from([None, "30", "29.9999", None, "30"]), label=f"{pid} compute")
            if goal is not None:
                self.bring_compute_to(pid, yesterday, goal)
        if data.draw(st.booleans(), label="scheduled jobs"):
            self.command("nightly")
            for month in self.ended_months():
                if month not in self.closed:
                    self.close(month)

    @rule(data=st.data())
    def late_data(self, data: st.DataObject) -> None:
        """Source rows arrive: compute or cloud usage of a past day (closed months too), a
        back-dated lifecycle event, or a project created today."""
        kinds = ["compute", "compute to the threshold", "compute to the threshold", "cloud", "event"]
        kinds += ["project"] * (len(self.projects) < MAX_PROJECTS)
        kind = data.draw(st.sampled_from(kinds), label="late data")
        {
            "compute": self.late_compute,
            "compute to the threshold": self.compute_to_the_threshold,
            "cloud": self.late_cloud,
            "event": self.backdated_event,
            "project": self.create_project,
        }[kind](data)

    def create_project(self, data: st.DataObject) -> None:
        pid = f"p{len(self.projects) + 1}"
        account = data.draw(st.sampled_from(ACCOUNTS), label="account")
        created = self.naive_now - timedelta(minutes=data.draw(st.integers(1, 300), label="minutes ago"))

        def build(data: SourceData) -> None:
            data.project(pid, created=created.isoformat(" "), account=account)
            data.accounts = []  # written at the start

        self.insert(build)
        self.projects[pid] = (account, created)

    def past_day(self, data: st.DataObject) -> date:
        """A day before today: a month first (so that a month's rows add up; closed months
        twice as often, as late data is what re-closes correct), then its day."""
        months = sorted(self.closed) + [m for m in MONTHS if month_days(m)[0] < self.today]
        month = data.draw(st.sampled_from(months), label="month")
        days = [d for d in month_days(month) if FIRST_DAY <= d < self.today]
        return data.draw(st.sampled_from(days), label="day")

    def late_compute(self, data: st.DataObject) -> None:
        pid = data.draw(st.sampled_from(sorted(self.projects)), label="project")
        day = self.past_day(data)
        second = data.draw(st.integers(0, 86_399), label="second")
        credits, count = data.draw(st.sampled_from(COMPUTE), label="credits")
        when = datetime.combine(day, datetime.min.time()) + timedelta(seconds=second)
        self.add_compute(pid, when, credits, count)

    def compute_to_the_threshold(self, data: st.DataObject) -> None:
        pid = data.draw(st.sampled_from(sorted(self.projects)), label="project")
        day = self.past_day(data)
        goal = data.draw(st.sampled_from(["30", "29.9999"]), label="month's compute")
        self.bring_compute_to(pid, day, goal)

    def bring_compute_to(self, pid: str, day: date, goal: str) -> None:
        """Compute on `day` that brings the project's month to `goal` exactly: 0.1 rows when
        the gap is a multiple of 0.1, else one row (a reversal when the month is above)."""
        month = month_of(day)
        gap = Decimal(goal) - sum(
            (c for p, when, c in self.compute if p == pid and month_of(when.date()) == month), Decimal(0)
        )
        if gap == 0:
            return
        rows = int(gap / Decimal("0.1")) if gap > 0 and gap % Decimal("0.1") == 0 else 1
        credits = "0.1" if rows > 1 or gap == Decimal("0.1") else str(gap)
        when = datetime.combine(day, datetime.min.time()) + timedelta(hours=12)
        self.add_compute(pid, when, credits, rows)

    def late_cloud(self, data: st.DataObject) -> None:
        pid = data.draw(st.sampled_from(sorted(self.projects)), label="project")
        day = self.past_day(data)
        metric = data.draw(st.sampled_from(METRICS), label="metric")
        quantity = data.draw(st.decimals(min_value=0, max_value=5000, places=4), label="quantity")
        usage_id = self.next_id("cl")
        self.insert(lambda d: d.cloud(pid, day.isoformat(), metric, str(quantity), usage_id=usage_id))

    def backdated_event(self, data: st.DataObject) -> None:
        """An event in the past (up to 80 days back), allowed or not (then a reject)."""
        pid = data.draw(st.sampled_from(sorted(self.projects)), label="project")
        kind = data.draw(st.sampled_from(EVENT_KINDS), label="kind")
        when = self.naive_now - timedelta(minutes=data.draw(st.integers(1, 80 * 24 * 60), label="minutes"))
        event_id = self.next_id("evt")
        self.insert(lambda d: d.event(pid, when.isoformat(" "), kind, event_id=event_id))

    @rule(data=st.data())
    def nightly(self, data: st.DataObject) -> None:
        """The catch-up (every unbilled day up to yesterday), or `--date` a day of a month
        not closed yet, or `--date` a closed month's day."""
        kinds = ["catch-up"] + ["open day"] * bool(self.open_days()) + ["closed day"] * bool(self.closed)
        kind = data.draw(st.sampled_from(kinds), label="nightly")
        if kind == "catch-up":
            self.command("nightly")
        elif kind == "open day":
            day = data.draw(st.sampled_from(self.open_days()), label="day")
            self.command("nightly", "--date", day.isoformat())
        else:
            month = data.draw(st.sampled_from(sorted(self.closed)), label="month")
            day = data.draw(st.sampled_from(month_days(month)), label="day")
            # A closed month's day is corrected by a re-close, not by nightly: refused.
            result = self.cli("nightly", "--date", day.isoformat())
            assert result.code == 2, result.stderr[-2000:]
            assert "which is closed" in result.stderr or "before the effective date" in result.stderr
            self.last = None

    @precondition(lambda self: bool(self.ended_months()))
    @rule(data=st.data())
    def month_end(self, data: st.DataObject) -> None:
        """`month-end --month M` of an ended month: its first close, or a re-close (closed
        months twice as often, and those with late data since their close three times),
        directly or held and then approved."""
        stale = [m for m in self.closed if self.compared.get(m) != self.version]
        months = self.ended_months() + sorted(self.closed) + stale
        month = data.draw(st.sampled_from(months), label="month")
        self.close(month, approval=data.draw(st.booleans(), label="hold and approve"))

    @precondition(lambda self: bool(self.closed))
    @rule(data=st.data())
    def reprice(self, data: st.DataObject) -> None:
        """A closed month re-billed with a lower cap from its first day on (`[[changes]]`):
        refused without `--reprice`, then written with it; then back to the settings of the
        other months, again with `--reprice`."""
        month = data.draw(st.sampled_from(sorted(self.closed)), label="month")
        config = self.tmp / f"cap-{month}.toml"
        change = (
            f'\n[[changes]]\neffective_from = "{month}-01"\n'
            f'storage_fee = {{ monthly_cap = "{REPRICED_CAP}" }}\n'
        )
        config.write_text(DEFAULT_CONFIG_TEXT + change, encoding="utf-8")
        lower = ("--config", str(config))
        refused = self.cli(*lower, "month-end", "--month", month)
        assert refused.code == 2, refused.stderr[-2000:]
        assert f"monthly_cap: '{CAP}' -> '{REPRICED_CAP}'" in refused.stderr
        self.command(*lower, "month-end", "--month", month, "--reprice")
        lines = self.invoiced(month)
        assert all(v[1] <= REPRICED_CAP for k, v in lines.items() if k[2] == "storage_fee"), lines
        assert lines == self.fresh(month, *lower), f"{month}: repriced invoices differ from a fresh close"
        self.command("month-end", "--month", month, "--reprice")
        self.closed[month] = len(self.compute)
        assert self.invoiced(month) == self.fresh(month), f"{month}: invoices differ from a fresh close"
        self.compared[month] = self.version

    @precondition(lambda self: self.last is not None)
    @rule()
    def repeat_last_command(self) -> None:
        """The same command again, same clock, same data: no table changes."""
        assert self.last is not None
        before = self.contents()
        self.command(*self.last)
        after = self.contents()
        changed = sorted(t for t in before if before[t] != after[t])
        assert not changed, f"repeating {self.last} changed {changed}"

    # --- invariants ---------------------------------------------------------------------

    @invariant()
    def daily_charges_respect_the_effective_date_free_windows_and_cap(self) -> None:
        with self.engine.connect() as conn:
            if not conn.dialect.has_table(conn, "charge_periods"):
                return
            rows = charge_days(conn)  # the storage fee stored ahead of the billed days too
        per_month: dict[tuple[str, str], Decimal] = {}
        for project, charge_type, charge_date, _, _, amount in rows:
            day = date.fromisoformat(charge_date)
            assert day >= EFFECTIVE, f"{project} charged {charge_type} on {day}, before {EFFECTIVE}"
            if charge_type != "storage_fee":
                continue
            created = self.projects[project][1].date()
            lo, hi = free_window(created)
            assert not lo <= day < hi, f"{project} (created {created}) charged on {day}, free until {hi}"
            assert 0 < units(amount) <= RATE, (project, day, amount)
            key = (project, month_of(day))
            per_month[key] = per_month.get(key, Decimal(0)) + units(amount)
        for (project, month), total in per_month.items():
            # Before its close, a month's days are charged as each night saw the data; a
            # back-dated event can move which days the cap leaves free, so the cap of the
            # daily charges is a property of closed months (the month-end's recomputation).
            if month in self.closed:
                assert total <= CAP, f"{project} charged {total} in closed {month}, cap {CAP}"

    @invariant()
    def closed_months_respect_the_cap_free_windows_and_waiver(self) -> None:
        for month, seen in self.closed.items():
            lines = self.invoiced(month)
            compute: dict[str, Decimal] = {}
            for project, when, credits in self.compute[:seen]:
                if month_of(when.date()) == month:
                    compute[project] = compute.get(project, Decimal(0)) + credits
            for project, (account, created_at) in self.projects.items():
                q_fee, fee = lines.get((account, project, "storage_fee"), (Decimal(0), Decimal(0)))
                _, refund = lines.get((account, project, "storage_refund"), (Decimal(0), Decimal(0)))
                lo, hi = free_window(created_at.date())
                billable = [
                    d
                    for d in month_days(month)
                    if d >= EFFECTIVE and d >= created_at.date() and not lo <= d < hi
                ]
                assert 0 <= fee <= CAP, f"{project} {month}: storage fee {fee}"
                assert q_fee <= len(billable), f"{project} {month}: {q_fee} days charged of {len(billable)}"
                assert fee == min(q_fee * RATE, CAP), (project, month, q_fee, fee)
                waived = fee > 0 and compute.get(project, Decimal(0)) >= THRESHOLD
                assert refund == (-fee if waived else 0), (
                    f"{project} {month}: compute {compute.get(project, 0)}, fee {fee}, refund {refund}"
                )

    def teardown(self) -> None:
        self.engine.dispose()
        self.mirror_engine.dispose()
        self.closes_only_engine.dispose()
        for drop in self.drops:
            drop()
        shutil.rmtree(self.tmp, ignore_errors=True)


NewDatabase = Callable[[], tuple[str, Callable[[], None]]]


def run_machine(new_database: NewDatabase, examples: int, steps: int) -> int:
    """Run the machine; BILLING_TEST_STATEFUL_EXAMPLES sets the number of examples (for a
    longer search than CI's, for example 200)."""
    examples = int(os.environ.get("BILLING_TEST_STATEFUL_EXAMPLES") or examples)
    machine = type("Billing", (BillingMachine,), {"new_database": staticmethod(new_database)})
    BillingMachine.examples_run = 0
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            # No shrinking: every step runs real commands; a failure is reported as drawn.
            phases=[Phase.explicit, Phase.reuse, Phase.generate],
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    return BillingMachine.examples_run


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
    ]
)
def databases(request: pytest.FixtureRequest) -> tuple[str, NewDatabase]:
    """(back end, a maker of empty databases): SQLite files, or PostgreSQL databases."""
    if request.param == "sqlite":
        tmp_path: Path = request.getfixturevalue("tmp_path")
        counter = iter(range(1_000_000))

        def new_sqlite() -> tuple[str, Callable[[], None]]:
            path = tmp_path / f"billing-{next(counter)}.db"
            return f"sqlite:///{path}", lambda: path.unlink(missing_ok=True)

        return "sqlite", new_sqlite
    server: PgServer = request.getfixturevalue("pg_server")

    def new_postgresql() -> tuple[str, Callable[[], None]]:
        name = server.create_database()
        return server.url(name), lambda: server.drop_database(name)

    return "postgresql", new_postgresql


def test_billing_state_machine(databases: tuple[str, NewDatabase]) -> None:
    backend, new_database = databases
    examples, steps = (5, 16) if backend == "sqlite" else (4, 12)
    assert run_machine(new_database, examples=examples, steps=steps) >= 1


class Draws:
    """Stands for Hypothesis's `data()` in a scripted run: hands out the given values in order."""

    def __init__(self, *values: object) -> None:
        self.values = list(values)

    def draw(self, strategy: object, label: str | None = None) -> Any:
        del strategy, label
        return self.values.pop(0)


def test_scripted_steps_of_the_machine(databases: tuple[str, NewDatabase]) -> None:
    """Sequences the random search reaches rarely, pinned: a closed month's waiver undone
    by a late reversal, a closed month's fee removed by a back-dated archive, each
    corrected by a re-close; the invariants checked after every step."""
    machine = type("Billing", (BillingMachine,), {"new_database": staticmethod(databases[1])})()
    steps: list[tuple[Callable[..., None], tuple[object, ...]]] = [
        (machine.start, (40,)),  # 2026-04-29
        # On 06-01, p1's May compute is exactly 30; the schedule closes March to May.
        (machine.advance_clock, (33, Draws("30", None, None, True))),
        (machine.repeat_last_command, ()),
        # A late reversal of 0.0001 in May: the waiver no longer applies.
        (
            machine.late_data,
            (Draws("compute to the threshold", "p1", "2026-05", date(2026, 5, 20), "29.9999"),),
        ),
        (machine.month_end, (Draws("2026-05", False),)),
        (machine.repeat_last_command, ()),
        # p2 archived back on 04-30 12:00: its May fee goes, April's 30th still counts.
        (machine.late_data, (Draws("event", "p2", "archived", (32 * 24 + 18) * 60),)),
        (machine.month_end, (Draws("2026-05", True),)),  # held, then approved
        (machine.repeat_last_command, ()),
        (machine.month_end, (Draws("2026-04", False),)),
        (machine.reprice, (Draws("2026-05"),)),  # cap 25 with --reprice, then back
        (machine.repeat_last_command, ()),
        (machine.nightly, (Draws("closed day", "2026-05", date(2026, 5, 3)),)),
        (machine.advance_clock, (5, Draws(None, None, "30", False))),
        (machine.nightly, (Draws("open day", date(2026, 6, 3)),)),
        (machine.repeat_last_command, ()),
        (machine.nightly, (Draws("catch-up"),)),
    ]
    try:
        for step, args in steps:
            step(*args)
            machine.daily_charges_respect_the_effective_date_free_windows_and_cap()
            machine.closed_months_respect_the_cap_free_windows_and_waiver()
        may = machine.invoiced("2026-05")
        assert ("acct-a", "p1", "storage_refund") not in may, may
        assert ("acct-b", "p2", "storage_fee") not in may, may
        assert may[("acct-a", "p1", "storage_fee")] == (Decimal(29), Decimal(29))
    finally:
        machine.teardown()
