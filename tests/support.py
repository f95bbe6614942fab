"""Test support: source data as readable tables, and the command line run in-process.

Scenarios read as data (a few rows in, lines out):

    data = SourceData()
    data.project("p1", created="2025-11-02")            # account "acct-1" by default
    data.event("p1", "2026-05-10 09:00", "archived")
    data.compute("p1", "2026-05-03 10:00", "0.1", count=300)
    data.cloud("p1", "2026-05-03", "page_views", "12345")
    data.write(engine)

    result = run_cli(db_url, "month-end", "--month", "2026-05")
    assert result.code == 0
    rows = export_rows(db_url, "2026-05")
"""

from __future__ import annotations

import csv
import io
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import pandas as pd
from click.testing import CliRunner
from sqlalchemy import Connection, Engine, create_engine, insert, select
from sqlalchemy import text as sql_text

from billing_jobs.cli import main
from billing_jobs.db.billing_tables import billed_days, charge_periods, month_closes, rejects
from billing_jobs.db.engine import make_engine
from billing_jobs.db.lock import WRITER_LOCK, Lease
from billing_jobs.db.source_tables import (
    accounts,
    cloud_usage,
    compute_usage,
    project_events,
    projects,
    redemption_codes,
    refund_requests,
    source_metadata,
    top_ups,
)
from billing_jobs.rules import periods
from billing_jobs.rules.calendar import day_from_number, day_number

_ids = itertools.count(1)


def ts(text: str) -> datetime:
    """'2026-05-10 09:00' or '2026-05-10' as a naive UTC datetime."""
    return datetime.fromisoformat(text)


@dataclass
class SourceData:
    """Rows for the source tables, written with the project's own schema."""

    accounts: list[dict[str, Any]] = field(default_factory=list)
    projects: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    compute_rows: list[dict[str, Any]] = field(default_factory=list)
    cloud_rows: list[dict[str, Any]] = field(default_factory=list)
    top_up_rows: list[dict[str, Any]] = field(default_factory=list)
    code_rows: list[dict[str, Any]] = field(default_factory=list)
    refund_rows: list[dict[str, Any]] = field(default_factory=list)

    def account(self, account_id: str = "acct-1", kind: str = "personal") -> SourceData:
        if not any(a["account_id"] == account_id for a in self.accounts):
            self.accounts.append(
                {"account_id": account_id, "kind": kind, "name": account_id, "created_at": ts("2025-01-01")}
            )
        return self

    def project(self, project_id: str, created: str, account: str = "acct-1") -> SourceData:
        self.account(account)
        self.projects.append(
            {"project_id": project_id, "account_id": account, "name": project_id, "created_at": ts(created)}
        )
        return self

    def event(self, project_id: str, when: str, kind: str, event_id: str | None = None) -> SourceData:
        self.events.append(
            {
                "event_id": event_id or f"evt-{next(_ids):06d}",
                "project_id": project_id,
                "occurred_at": ts(when),
                "kind": kind,
            }
        )
        return self

    def compute(
        self, project_id: str, when: str, credits: str | None, count: int = 1, usage_id: str | None = None
    ) -> SourceData:
        for i in range(count):
            self.compute_rows.append(
                {
                    "usage_id": usage_id if usage_id and count == 1 else f"cu-{next(_ids):07d}",
                    "project_id": project_id,
                    "occurred_at": ts(when),
                    "credits": None if credits is None else Decimal(credits),
                }
            )
            del i
        return self

    def cloud(
        self, project_id: str, day: str, metric: str, quantity: str | None, usage_id: str | None = None
    ) -> SourceData:
        self.cloud_rows.append(
            {
                "usage_id": usage_id or f"cl-{next(_ids):07d}",
                "project_id": project_id,
                "usage_date": date.fromisoformat(day),
                "metric": metric,
                "quantity": None if quantity is None else Decimal(quantity),
            }
        )
        return self

    def top_up(
        self,
        top_up_id: str,
        when: str,
        channel: str = "online",
        *,
        account: str = "acct-1",
        credits: str | None = None,
        amount: str | None = None,
        code: str | None = None,
        known: bool = True,
    ) -> SourceData:
        """A top-up; `known=False` leaves its account out of `accounts`."""
        if known:
            self.account(account)
        self.top_up_rows.append(
            {
                "top_up_id": top_up_id,
                "account_id": account,
                "channel": channel,
                "credits": None if credits is None else Decimal(credits),
                "amount_paid": None if amount is None else Decimal(amount),
                "paid_at": ts(when),
                "code": code,
            }
        )
        return self

    def code(
        self, code: str, credits: str, redeem_by: str, valid_days: int, batch: str = "event-1"
    ) -> SourceData:
        self.code_rows.append(
            {
                "code": code,
                "batch_id": batch,
                "credits": Decimal(credits),
                "redeem_by": ts(redeem_by),
                "valid_days": valid_days,
            }
        )
        return self

    def refund_request(self, request_id: str, when: str, account: str = "acct-1") -> SourceData:
        self.refund_rows.append({"request_id": request_id, "account_id": account, "requested_at": ts(when)})
        return self

    def write(self, engine: Engine) -> None:
        """Create the source tables if needed and insert the rows."""
        source_metadata.create_all(engine)
        with engine.begin() as conn:
            for table, rows in (
                (accounts, self.accounts),
                (projects, self.projects),
                (project_events, self.events),
                (compute_usage, self.compute_rows),
                (cloud_usage, self.cloud_rows),
                (top_ups, self.top_up_rows),
                (redemption_codes, self.code_rows),
                (refund_requests, self.refund_rows),
            ):
                if rows:
                    conn.execute(insert(table), rows)
        self.accounts, self.projects, self.events, self.compute_rows, self.cloud_rows = [], [], [], [], []
        self.top_up_rows, self.code_rows, self.refund_rows = [], [], []

    def write_url(self, db_url: str) -> None:
        engine = create_engine(db_url)
        try:
            self.write(engine)
        finally:
            engine.dispose()


@dataclass(frozen=True)
class CliResult:
    code: int
    stdout: str
    stderr: str


def run_cli(db_url: str | None, *args: str, env: dict[str, str] | None = None) -> CliResult:
    """Run `billing-jobs [--db-url URL] ARGS` in-process, exit status mapped as in production."""
    runner = CliRunner()
    argv = (["--db-url", db_url] if db_url else []) + list(args)
    code = 0
    with runner.isolation(env=env) as (out, err, _):
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        stdout = out.getvalue().decode()
        stderr = err.getvalue().decode() if err is not None else ""
    return CliResult(code, stdout, stderr)


def ok(db_url: str | None, *args: str) -> str:
    """`run_cli` that must exit 0; its stdout."""
    result = run_cli(db_url, *args)
    assert result.code == 0, result.stderr
    return result.stdout


@contextmanager
def holding_writer_lock(
    db_url: str,
    *,
    since: str = "2026-01-01",
    run_id: str = "other-run",
    name: str = WRITER_LOCK,
    host: str = "elsewhere",
    pid: int = 1,
) -> Iterator[Lease]:
    """Hold a writer lock as a live run on another host does, until the block ends."""
    engine = make_engine(db_url)
    lease = Lease(engine, name, run_id, host, pid, 60)
    try:
        lease.acquire(ts(since))
        try:
            yield lease
        finally:
            lease.release()
    finally:
        engine.dispose()


def run_sql(db_url: str, *statements: str) -> None:
    """Statements on the database in one transaction, as another system would write."""
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(sql_text(statement))
    finally:
        engine.dispose()


def reject_reasons(db_url: str) -> set[tuple[str, str, str]]:
    """The rejects recorded: (source_table, source_id, reason)."""
    engine = create_engine(db_url)
    r = rejects.c
    try:
        with engine.connect() as conn:
            return {tuple(row) for row in conn.execute(select(r.source_table, r.source_id, r.reason))}
    finally:
        engine.dispose()


def export_text(db_url: str, month: str) -> str:
    result = run_cli(db_url, "export", "--month", month)
    assert result.code == 0, result.stderr
    return result.stdout


def export_rows(db_url: str, month: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(export_text(db_url, month))))


def lines_by(rows: list[dict[str, str]], *key: str) -> dict[tuple[str, ...], Decimal]:
    """Sum `amount` of export rows per key columns, as exact decimals."""
    out: dict[tuple[str, ...], Decimal] = {}
    for r in rows:
        k = tuple(r[c] for c in key)
        out[k] = out.get(k, Decimal(0)) + Decimal(r["amount"])
    return out


def iter_lines(rows: list[dict[str, str]], line_type: str) -> Iterator[dict[str, str]]:
    return (r for r in rows if r["line_type"] == line_type)


# --- The charge store, day by day --------------------------------------------------------

CHARGE_DAY_COLUMNS = [
    "project_id",
    "charge_type",
    "charge_date",
    "account_id",
    "quantity_units",
    "amount_units",
]


def _stored_periods(conn: Connection) -> pd.DataFrame:
    rows = conn.execute(select(*[charge_periods.c[c] for c in periods.COLUMNS])).all()
    frame = pd.DataFrame(rows, columns=periods.COLUMNS)
    for column in ("first_day", "last_day"):
        frame[column] = [day_number(d) for d in frame[column]]
    return frame


def charge_days(db_url: str | Connection, *, billed_only: bool = False) -> list[tuple[Any, ...]]:
    """Every stored charge as one row per day (CHARGE_DAY_COLUMNS, the date as ISO text),
    sorted: (project_id, charge_type, charge_date, account_id, quantity_units,
    amount_units). billed_only: without the storage fee stored ahead of the last billed day
    (days after it in months not closed)."""
    if not isinstance(db_url, str):
        return _charge_days(db_url, billed_only)
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return _charge_days(conn, billed_only)
    finally:
        engine.dispose()


def _charge_days(conn: Connection, billed_only: bool) -> list[tuple[Any, ...]]:
    days = periods.to_days(_stored_periods(conn))
    out = sorted(
        (p, t, day_from_number(int(d)).isoformat(), a, int(q), int(m))
        for p, a, t, d, q, m in days[periods.DAY_COLUMNS].itertuples(index=False)
    )
    if not billed_only:
        return out
    billed = {str(d)[:10] for (d,) in conn.execute(select(billed_days.c.billing_day))}
    closed = {p for (p,) in conn.execute(select(month_closes.c.period))}
    return [r for r in out if r[2] in billed or r[2][:7] in closed]


def rewrite_charge_days(db_url: str, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    """Change the stored charges day by day, as a person editing the table would: every
    day read (DAY_COLUMNS, days as day numbers), `edit`ed, and stored back as periods."""
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            days = edit(periods.to_days(_stored_periods(conn)))
            stored = periods.from_days(days)
            conn.execute(charge_periods.delete())
            if len(stored):
                conn.execute(
                    charge_periods.insert(),
                    [
                        {
                            "project_id": p,
                            "charge_type": t,
                            "first_day": day_from_number(int(f)),
                            "last_day": day_from_number(int(e)),
                            "days": int(n),
                            "account_id": a,
                            "quantity_units": int(q),
                            "amount_units": int(m),
                            "daily": d,
                            "run_id": "edited",
                            "recorded_at": ts("2026-01-01"),
                        }
                        for p, t, f, e, n, a, q, m, d in stored[periods.COLUMNS].itertuples(index=False)
                    ],
                )
    finally:
        engine.dispose()


def day_of(iso: str) -> int:
    return day_number(date.fromisoformat(iso))
