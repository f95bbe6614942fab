"""One account's month for the customer: each project's days charged and waived and why,
refunds, cloud fees, the total, and the account's credits.

Money comes from the stored, finalized invoice lines (the figures of `export`) and the
credits ledger (the figures of `credits report` and `credits history`). The days and
the reasons come from the pipeline the invoices come from (`compute_chunk` for the
account, as `explain` uses it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, inspect, select

from billing_jobs.db.billing_tables import invoices, month_closes
from billing_jobs.db.source_tables import accounts, projects
from billing_jobs.db.sql import Chunk
from billing_jobs.jobs.compute import compute_chunk, waiver_threshold_units
from billing_jobs.jobs.credits import (
    REPORT_COLUMNS,
    LedgerMissing,
    account_balance,
    history_rows,
    month_report,
)
from billing_jobs.jobs.report import LINE_RANK, read_lines
from billing_jobs.rules.calendar import Month
from billing_jobs.rules.invoice import STORAGE_FEE, STORAGE_REFUND
from billing_jobs.rules.money import format_units
from billing_jobs.rules.storage_fee import BEFORE_EFFECTIVE, CAP_REACHED, CHARGED, FREE_LEGACY, FREE_NEW
from billing_jobs.settings import Settings

DAY_STATUSES = (CHARGED, FREE_NEW, FREE_LEGACY, BEFORE_EFFECTIVE, CAP_REACHED)
STATUS_WORDS = {
    CHARGED: "charged",
    FREE_NEW: "free: first month of a new project",
    FREE_LEGACY: "free: legacy month (project created before the fee started)",
    BEFORE_EFFECTIVE: "free: before the storage fee started",
    CAP_REACHED: "free: monthly cap reached",
}
NOT_ACTIVE = "no active day this month (archived, deleted or not created yet)"
CSV_HEADER = ["account_id", "period", "project_id", "line_type", "quantity", "amount", "note"]


class UnknownAccount(LookupError):
    """No such account in the source tables."""


class NotInvoiced(LookupError):
    """The month is not closed: there is no invoice to state."""


@dataclass(frozen=True)
class ProjectPart:
    project_id: str
    days: dict[str, int]  # day status -> days
    waiver: str  # why the storage fee was or was not refunded
    lines: list[tuple[str, int, int]]  # (line_type, quantity_units, amount_units), finalized

    @property
    def total_units(self) -> int:
        return sum(a for _, _, a in self.lines)

    def amount(self, line_type: str) -> int:
        return sum(a for t, _, a in self.lines if t == line_type)

    @property
    def cloud_units(self) -> int:
        return sum(a for t, _, a in self.lines if t not in (STORAGE_FEE, STORAGE_REFUND))


@dataclass(frozen=True)
class Statement:
    account_id: str
    account_name: str
    month: Month
    currency: str
    invoice_ids: list[str]
    projects: list[ProjectPart]
    credits: dict[str, int] | None  # the account's row of `credits report`; None without a ledger
    credit_history: list[dict[str, str]] = field(default_factory=list)
    invoice_numbers: list[str] = field(default_factory=list)  # the numbers finalization gave them

    @property
    def total_units(self) -> int:
        return sum(p.total_units for p in self.projects)


def _waiver_words(compute_units: int, threshold: int | None, refund_units: int, charged_units: int) -> str:
    if threshold is None:
        return "the active-project waiver is off"
    compute, limit = format_units(compute_units), format_units(threshold)
    if refund_units:
        return f"compute {compute} ≥ {limit} credits: storage fee {format_units(-refund_units)} refunded"
    if compute_units >= threshold and not charged_units:
        return f"compute {compute} ≥ {limit} credits, but no storage fee to refund"
    return f"compute {compute} < {limit} credits: no refund"


def build_statement(engine: Engine, settings: Settings, account_id: str, month: Month) -> Statement:
    period = str(month)
    with engine.connect() as conn:
        account = conn.execute(select(accounts.c.name).where(accounts.c.account_id == account_id)).first()
        if account is None:
            raise UnknownAccount(f"unknown account {account_id!r}")
        if "month_closes" not in inspect(conn).get_table_names() or (
            conn.execute(select(month_closes.c.period).where(month_closes.c.period == period)).first() is None
        ):
            raise NotInvoiced(f"month {period} is not closed: run `billing-jobs month-end --month {period}`")
        lines = read_lines(conn, period)
        lines = lines.loc[lines["account_id"] == account_id]
        finalized = sorted(
            (r.invoice_id, r.invoice_number or "")
            for r in conn.execute(
                select(invoices.c.invoice_id, invoices.c.invoice_number).where(
                    invoices.c.account_id == account_id,
                    invoices.c.period == period,
                    invoices.c.status == "finalized",
                )
            )
        )
        invoice_ids = [i for i, _ in finalized]
        invoice_numbers = sorted(n for _, n in finalized if n)
        has_projects = (
            conn.execute(select(projects.c.project_id).where(projects.c.account_id == account_id)).first()
            is not None
        )
        result = compute_chunk(conn, settings, month, Chunk.only(account_id)) if has_projects else None

    threshold = waiver_threshold_units(settings.for_month(month.first_day))
    ids = set(lines["project_id"])
    days: dict[str, dict[str, int]] = {}
    compute: dict[str, int] = {}
    refunds: dict[str, int] = {}
    if result is not None:
        counted = result.storage.groupby(["project_id", "status"], observed=True).size()
        for (pid, status), n in counted.items():
            days.setdefault(str(pid), {})[str(status)] = int(n)
        ids |= set(days)
        if result.compute is not None:
            compute = dict(
                zip(result.compute["project_id"], result.compute["compute_units"].astype(int), strict=True)
            )
        if result.refunds is not None:
            refunds = dict(
                zip(result.refunds["project_id"], result.refunds["amount_units"].astype(int), strict=True)
            )
    parts = []
    for pid in sorted(ids):
        mine = lines.loc[lines["project_id"] == pid]
        summed = mine.groupby("line_type")[["quantity_units", "amount_units"]].sum()
        found = sorted(
            ((str(t), int(r.quantity_units), int(r.amount_units)) for t, r in summed.iterrows()),
            key=lambda x: (LINE_RANK.get(x[0], 99), x[0]),
        )
        charged = sum(a for t, _, a in found if t == STORAGE_FEE)
        parts.append(
            ProjectPart(
                project_id=pid,
                days={s: days.get(pid, {}).get(s, 0) for s in DAY_STATUSES},
                waiver=_waiver_words(compute.get(pid, 0), threshold, refunds.get(pid, 0), charged),
                lines=found,
            )
        )
    credits_row: dict[str, int] | None = None
    history: list[dict[str, str]] = []
    try:
        report = month_report(engine, period, account_id)
        mine_row = report.loc[report["account_id"] == account_id]
        credits_row = {c: int(mine_row[c].sum()) for c in REPORT_COLUMNS[1:]}
        history = list(history_rows(account_balance(engine, settings, account_id, month.last_day), month))
    except LedgerMissing:
        pass
    return Statement(
        account_id=account_id,
        account_name=str(account.name),
        month=month,
        currency=settings.currency,
        invoice_ids=invoice_ids,
        projects=parts,
        credits=credits_row,
        credit_history=history,
        invoice_numbers=invoice_numbers,
    )


def csv_rows(s: Statement) -> list[list[Any]]:
    """The statement as CSV rows: one per invoiced line (amounts as in `export`), then the total."""
    rows: list[list[Any]] = []
    period = str(s.month)
    for p in s.projects:
        note = "; ".join(f"{n} day(s) {STATUS_WORDS[k]}" for k, n in p.days.items() if n) or NOT_ACTIVE
        for i, (t, q, a) in enumerate(p.lines):
            why = p.waiver if t == STORAGE_REFUND else note if i == 0 else ""
            rows.append([s.account_id, period, p.project_id, t, format_units(q), format_units(a), why])
        if not p.lines:
            rows.append([s.account_id, period, p.project_id, "", "0", "0", note])
    rows.append([s.account_id, period, "", "total", "", format_units(s.total_units), ""])
    return rows
