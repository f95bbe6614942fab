"""The month report for finance: what was billed, what the promotions and the waiver cost,
what was rejected, the credits roll-forward, how the month compares with the last ones.

Every money figure is read from the stored invoices (finalized lines) and the credits
ledger, so the report adds up to `export` and `credits export`. The one figure that is
not stored, the credits a free month cost (free days are not charges), is recomputed
with the rules core (`storage_days`, vectorized, chunk by chunk): the storage fee the
project's days would have been charged without the promotion, minus what they were.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Connection, Engine, cast, func, inspect, select

from billing_jobs.db import reads
from billing_jobs.db.billing_tables import (
    billing_runs,
    credit_entries,
    invoice_lines,
    invoices,
    month_closes,
    rejects,
)
from billing_jobs.frames import pd
from billing_jobs.jobs.compute import storage_rules
from billing_jobs.jobs.credits import REPORT_COLUMNS, month_report
from billing_jobs.jobs.month_controls import changes, pinned
from billing_jobs.rules.calendar import Month
from billing_jobs.rules.invoice import LINE_ORDER, STORAGE_FEE, STORAGE_REFUND
from billing_jobs.rules.lifecycle import build_lifecycle
from billing_jobs.rules.storage_fee import FREE_LEGACY, FREE_NEW, storage_days
from billing_jobs.settings import Settings

PROJECTS_PER_CHUNK = 10_000
HISTORY_MONTHS = 12
TOP_ACCOUNTS = 10
LINE_RANK = {t: i for i, t in enumerate(LINE_ORDER)}


class NothingToReport(LookupError):
    """The jobs' tables are missing or the month has no finalized invoice."""


@dataclass(frozen=True)
class Promotion:
    """Projects a rule let off (or refunded) in the month, and the credits it cost."""

    name: str
    projects: int
    days: int | None  # free days (None for the waiver, which refunds a month)
    cost_units: int


@dataclass(frozen=True)
class MonthReport:
    month: Month
    currency: str
    closed_at: datetime | None
    line_totals: pd.DataFrame  # line_type, projects, quantity_units, amount_units
    invoice_count: int
    account_count: int
    total_units: int
    promotions: list[Promotion]
    credits: dict[str, int]  # REPORT_COLUMNS summed over accounts (units or cents)
    rejects: pd.DataFrame  # source_table, reason, rows
    history: pd.DataFrame  # period, one column per line type, waiver_refunds, rejects, funded, drawn
    top_accounts: pd.DataFrame  # account_id, projects, invoices, amount_units
    runs: pd.DataFrame  # run_id, job, status, settings_hash, started_at, finished_at
    settings_hash: str | None  # the settings the month was last billed with (month_closes)
    settings_changes: list[str]  # how the settings in force now differ from those: `key: old -> new`


def _finalized_lines(period: str) -> Any:
    il, inv = invoice_lines.c, invoices.c
    return (
        select(il.account_id, il.project_id, il.line_type, il.invoice_id, il.quantity_units, il.amount_units)
        .join(invoices, inv.invoice_id == il.invoice_id)
        .where(il.period == period, inv.status == "finalized")
    )


def read_lines(conn: Connection, period: str) -> pd.DataFrame:
    """The finalized invoice lines of `period` (regular and adjustments): what `export` writes."""
    return reads.read_frame(conn, _finalized_lines(period), ints=["quantity_units", "amount_units"])


def line_totals(lines: pd.DataFrame) -> pd.DataFrame:
    if lines.empty:
        return pd.DataFrame(columns=["line_type", "projects", "quantity_units", "amount_units"])
    nonzero = lines.groupby(["project_id", "line_type"], as_index=False)["amount_units"].sum()
    projects = nonzero.loc[nonzero["amount_units"] != 0].groupby("line_type")["project_id"].nunique()
    sums = lines.groupby("line_type")[["quantity_units", "amount_units"]].sum()
    out = sums.assign(projects=projects.reindex(sums.index).fillna(0).astype(int)).reset_index()
    out = out.assign(_rank=out["line_type"].map(LINE_RANK).fillna(99))
    out = out.sort_values(["_rank", "line_type"]).drop(columns="_rank").reset_index(drop=True)
    return out[["line_type", "projects", "quantity_units", "amount_units"]]


def free_month_costs(conn: Connection, settings: Settings, month: Month) -> pd.DataFrame:
    """Per project let off by a free month: project_id, account_id, kind (free_first_month |
    free_legacy_month), days (free days), cost_units (storage fee the days would have cost
    without the promotion, monthly cap included, minus what the month was charged)."""
    s = settings.for_month(month.first_day)
    rules = storage_rules(s)
    without = dataclasses.replace(rules, new_project_free_months=0, legacy_free_months=0)
    parts = []
    for chunk in reads.plan_chunks(conn, PROJECTS_PER_CHUNK):
        projects = reads.read_projects(conn, chunk)
        lifecycle = build_lifecycle(projects, reads.read_events(conn, chunk))
        active = lifecycle.intervals.loc[lifecycle.intervals["state"] == "active"]
        actual = storage_days(projects, active, month, s.zone, rules)
        free = actual.loc[actual["status"].isin([FREE_NEW, FREE_LEGACY])]
        if free.empty:
            continue
        full = storage_days(projects, active, month, s.zone, without)
        charged = actual.groupby("project_id")["amount_units"].sum()
        would = full.groupby("project_id")["amount_units"].sum()
        found = (
            free.assign(kind=free["status"].astype(str))
            .groupby("project_id", as_index=False)
            .agg(kind=("kind", "first"), days=("day", "size"))
        )
        ids = found["project_id"]
        accounts = projects.set_index("project_id")["account_id"]
        parts.append(
            found.assign(
                account_id=accounts.reindex(ids).to_numpy(dtype=object),
                cost_units=(would.reindex(ids).to_numpy() - charged.reindex(ids).to_numpy()).astype("int64"),
            )
        )
    columns = ["project_id", "account_id", "kind", "days", "cost_units"]
    if not parts:
        return pd.DataFrame(columns=columns)
    return pd.concat(parts, ignore_index=True)[columns]


def _promotions(lines: pd.DataFrame, free: pd.DataFrame) -> list[Promotion]:
    def project_sums(line_type: str) -> pd.Series:
        found = lines.loc[lines["line_type"] == line_type]
        return found.groupby("project_id")["amount_units"].sum()

    charged, refunded = project_sums(STORAGE_FEE), project_sums(STORAGE_REFUND)
    out = [Promotion("charged the storage fee", int((charged > 0).sum()), None, int(charged.sum()))]
    for kind, name in ((FREE_NEW, "free first month"), (FREE_LEGACY, "legacy free month")):
        mine = free.loc[free["kind"] == kind]
        out.append(Promotion(name, len(mine), int(mine["days"].sum()), int(mine["cost_units"].sum())))
    out.append(
        Promotion(
            "refunded by the active-project waiver", int((refunded < 0).sum()), None, -int(refunded.sum())
        )
    )
    return out


def _credits(engine: Engine, period: str) -> dict[str, int]:
    df = month_report(engine, period)
    return {c: int(df[c].sum()) if len(df) else 0 for c in REPORT_COLUMNS[1:]}


def _rejects(conn: Connection, period: str) -> pd.DataFrame:
    r = rejects.c
    stmt = (
        select(r.source_table, r.reason, func.count().label("rows"))
        .where(r.period == period)
        .group_by(r.source_table, r.reason)
    )
    df = reads.read_frame(conn, stmt, ints=["rows"], aggregate=True)
    return df.sort_values(["source_table", "reason"]).reset_index(drop=True)


def closed_months(conn: Connection, month: Month) -> list[str]:
    """The closed months up to `month`, the last `HISTORY_MONTHS` of them, oldest first."""
    c = month_closes.c
    rows = conn.execute(
        select(c.period).where(c.period <= str(month)).order_by(c.period.desc()).limit(HISTORY_MONTHS)
    )
    return sorted(r.period for r in rows)


def _history(conn: Connection, periods: list[str]) -> pd.DataFrame:
    il, inv, e, r = invoice_lines.c, invoices.c, credit_entries.c, rejects.c
    fees = reads.read_frame(
        conn,
        select(il.period, il.line_type, cast(func.sum(il.amount_units), BigInteger).label("amount_units"))
        .join(invoices, inv.invoice_id == il.invoice_id)
        .where(il.period.in_(periods), inv.status == "finalized")
        .group_by(il.period, il.line_type),
        ints=["amount_units"],
        aggregate=True,
    )
    bad = reads.read_frame(
        conn,
        select(r.period, func.count().label("rows")).where(r.period.in_(periods)).group_by(r.period),
        ints=["rows"],
        aggregate=True,
    )
    moves = reads.read_frame(
        conn,
        select(e.period, e.kind, cast(func.sum(e.credit_units), BigInteger).label("credit_units"))
        .where(e.period.in_(periods), e.kind.in_(["fund", "draw"]))
        .group_by(e.period, e.kind),
        ints=["credit_units"],
        aggregate=True,
    )
    out = pd.DataFrame({"period": periods})
    for line_type in LINE_ORDER:
        found = fees.loc[fees["line_type"] == line_type].set_index("period")["amount_units"]
        out[line_type] = found.reindex(periods).fillna(0).astype("int64").to_numpy()
    out["waiver_refunds"] = -out[STORAGE_REFUND]
    out["rejects"] = bad.set_index("period")["rows"].reindex(periods).fillna(0).astype("int64").to_numpy()
    for kind, column in (("fund", "funded"), ("draw", "drawn")):
        found = moves.loc[moves["kind"] == kind].set_index("period")["credit_units"]
        out[column] = found.reindex(periods).fillna(0).astype("int64").to_numpy()
    return out


def _top_accounts(lines: pd.DataFrame) -> pd.DataFrame:
    if lines.empty:
        return pd.DataFrame(columns=["account_id", "projects", "invoices", "amount_units"])
    top = lines.groupby("account_id", as_index=False).agg(
        projects=("project_id", "nunique"),
        invoices=("invoice_id", "nunique"),
        amount_units=("amount_units", "sum"),
    )
    top = top.sort_values(["amount_units", "account_id"], ascending=[False, True], kind="stable")
    return top.head(TOP_ACCOUNTS).reset_index(drop=True)


def _runs(conn: Connection, period: str) -> pd.DataFrame:
    b = billing_runs.c
    stmt = (
        select(b.run_id, b.job, b.status, b.settings_hash, b.started_at, b.finished_at, b.counts)
        .where(b.period == period)
        .order_by(b.started_at, b.run_id)
    )
    df = reads.read_frame(conn, stmt, timestamps=["started_at", "finished_at"])
    df["invoices"] = [_count(c, "invoices") for c in df["counts"]]
    return df.drop(columns="counts")


def _count(counts: Any, key: str) -> str:
    try:
        value = json.loads(counts or "{}").get(key)
    except (TypeError, ValueError):
        return ""
    return "" if value is None else str(value)


def build_report(engine: Engine, settings: Settings, month: Month) -> MonthReport:
    """Read the month's report; raises `NothingToReport` when nothing was invoiced."""
    period = str(month)
    with engine.connect() as conn:
        if not {"invoices", "month_closes", "credit_entries"} <= set(inspect(conn).get_table_names()):
            raise NothingToReport("the jobs' tables do not exist yet: run `billing-jobs db upgrade`")
        close = conn.execute(select(month_closes.c.closed_at).where(month_closes.c.period == period)).first()
        if close is None:
            raise NothingToReport(
                f"month {period} is not closed: run `billing-jobs month-end --month {period}`"
            )
        lines = read_lines(conn, period)
        free = free_month_costs(conn, settings, month)
        bad = _rejects(conn, period)
        history = _history(conn, closed_months(conn, month))
        runs = _runs(conn, period)
        pin = pinned(conn, month)
    return MonthReport(
        month=month,
        currency=settings.currency,
        closed_at=close.closed_at,
        line_totals=line_totals(lines),
        invoice_count=int(lines["invoice_id"].nunique()) if len(lines) else 0,
        account_count=int(lines["account_id"].nunique()) if len(lines) else 0,
        total_units=int(lines["amount_units"].sum()) if len(lines) else 0,
        promotions=_promotions(lines, free),
        credits=_credits(engine, period),
        rejects=bad,
        history=history,
        top_accounts=_top_accounts(lines),
        runs=runs,
        settings_hash=pin.settings_hash if pin else None,
        settings_changes=changes(pin, settings.for_month(month.first_day)),
    )
