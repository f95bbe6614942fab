"""Explain one project's billing month, day by day, for support.

Built on `jobs.compute.compute_chunk`, the pipeline the invoices come from, so
the explanation and the invoice cannot disagree: every number here is read off
the same result (storage days with their status, lifecycle intervals and
events, cloud fees, compute total and waiver refunds, month lines). The
invoice lines actually written for the project are read next to it, and any
difference (source data that changed after the month was closed) is shown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, Engine, inspect, select

from billing_jobs.db.billing_tables import invoice_lines, invoices, month_closes
from billing_jobs.db.source_tables import projects
from billing_jobs.db.sql import Chunk
from billing_jobs.frames import pd
from billing_jobs.jobs.compute import compute_chunk, source_rejects, waiver_threshold_units
from billing_jobs.rules.calendar import Month, day_number, local_midnight_utc
from billing_jobs.rules.cloud_fee import published_days
from billing_jobs.rules.invoice import LINE_ORDER
from billing_jobs.rules.money import format_units
from billing_jobs.rules.storage_fee import (
    BEFORE_EFFECTIVE,
    CAP_REACHED,
    CHARGED,
    FREE_LEGACY,
    FREE_NEW,
)
from billing_jobs.settings import Settings

FREE_STATUSES = (FREE_NEW, FREE_LEGACY, BEFORE_EFFECTIVE)
LIFECYCLE_KINDS = ("archived", "restored", "deleted")
LINE_RANK = {t: i for i, t in enumerate(LINE_ORDER)}
NOT_CREATED, ACTIVE, ARCHIVED, DELETED = "not_created", "active", "archived", "deleted"


class UnknownProject(LookupError):
    """No project with that id in the source tables."""


@dataclass(frozen=True)
class EventNote:
    event_id: str
    kind: str
    occurred_at: datetime  # naive UTC
    local_time: str  # HH:MM:SS in the billing timezone
    accepted: bool
    reason: str  # '' when accepted


@dataclass(frozen=True)
class CloudFee:
    metric: str
    line_type: str
    quantity_units: int
    amount_units: int


@dataclass(frozen=True)
class DayView:
    day: date
    active: bool
    state: str  # at the end of the day: not_created | active | archived | deleted
    why: str  # words: "created 14:00", "archived 09:00", "archived since 2026-05-10 09:00", ...
    created_today: bool
    events: list[EventNote]
    storage_status: str  # '' when not active, else a storage_fee status
    storage_units: int
    published: bool
    cloud: list[CloudFee]

    @property
    def free(self) -> str | None:
        return self.storage_status if self.storage_status in FREE_STATUSES else None

    @property
    def cap_reached(self) -> bool:
        return self.storage_status == CAP_REACHED

    @property
    def charged(self) -> bool:
        return self.storage_status == CHARGED


@dataclass(frozen=True)
class Line:
    line_type: str
    quantity_units: int
    amount_units: int
    unit_price: str = ""


@dataclass(frozen=True)
class InvoicedLine:
    invoice_id: str
    invoice_kind: str
    sequence: int
    status: str
    line_type: str
    quantity_units: int
    unit_price: str
    amount_units: int


@dataclass(frozen=True)
class Waiver:
    compute_units: int
    threshold_units: int | None
    storage_units: int
    refund_units: int  # negative or 0

    @property
    def reached(self) -> bool:
        return self.threshold_units is not None and self.compute_units >= self.threshold_units

    @property
    def applies(self) -> bool:
        return self.refund_units != 0

    @property
    def why(self) -> str:
        compute = format_units(self.compute_units)
        if self.threshold_units is None:
            return f"compute {compute}: the waiver is turned off"
        threshold = format_units(self.threshold_units)
        if not self.reached:
            return f"compute {compute} < threshold {threshold}: no refund"
        if not self.applies:
            return f"compute {compute} >= threshold {threshold}, but no storage fee to refund"
        return (
            f"compute {compute} >= threshold {threshold}: "
            f"storage fee {format_units(self.storage_units)} refunded"
        )


@dataclass(frozen=True)
class Explanation:
    project_id: str
    account_id: str
    month: Month
    timezone: str
    created_at: datetime  # naive UTC
    days: list[DayView]
    waiver: Waiver
    totals: list[Line]  # the recomputed month lines: what the invoices must sum to
    invoiced: list[InvoicedLine]  # lines written for this project and month (every invoice)
    rejected_rows: pd.DataFrame  # source rows of this project and month that were rejected
    closed: bool
    notes: list[str] = field(default_factory=list)

    @property
    def invoiced_totals(self) -> list[Line]:
        """Sum of the finalized invoice lines (regular + adjustments) per line type."""
        sums: dict[str, list[int]] = {}
        for line in self.invoiced:
            if line.status == "finalized":
                q, a = sums.setdefault(line.line_type, [0, 0])
                sums[line.line_type] = [q + line.quantity_units, a + line.amount_units]
        return _ordered([Line(t, q, a) for t, (q, a) in sums.items()])

    @property
    def differences(self) -> list[Line]:
        """Recomputed minus invoiced, per line type; empty when they agree."""
        truth = {x.line_type: x for x in self.totals}
        billed = {x.line_type: x for x in self.invoiced_totals}
        out = []
        for t in {*truth, *billed}:
            a, b = truth.get(t, Line(t, 0, 0)), billed.get(t, Line(t, 0, 0))
            dq, da = a.quantity_units - b.quantity_units, a.amount_units - b.amount_units
            if dq or da:
                out.append(Line(t, dq, da))
        return _ordered(out)

    @property
    def matches_invoices(self) -> bool:
        return not self.differences


def _ordered(lines: list[Line]) -> list[Line]:
    rank = {t: i for i, t in enumerate(LINE_ORDER)}
    return sorted(lines, key=lambda x: (rank.get(x.line_type, 99), x.line_type))


# ---------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------


def _naive(value: Any) -> datetime:
    """A timestamp (text, pandas or datetime) as naive UTC."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if isinstance(value, pd.Timestamp):
        value = value.to_pydatetime()
    ts: datetime = value
    return ts.astimezone(UTC).replace(tzinfo=None) if ts.tzinfo else ts


def _local(ts: datetime, zone: ZoneInfo) -> datetime:
    return ts.replace(tzinfo=UTC).astimezone(zone)


def find_account(conn: Connection, project_id: str) -> tuple[str, datetime]:
    row = conn.execute(
        select(projects.c.account_id, projects.c.created_at).where(projects.c.project_id == project_id)
    ).first()
    if row is None:
        raise UnknownProject(f"unknown project {project_id!r}")
    return row.account_id, _naive(row.created_at)


def explain_project(
    engine: Engine, settings: Settings, project_id: str, month: Month, *, through: date | None = None
) -> Explanation:
    """Explain `project_id`'s billing of `month`; raises `UnknownProject`.

    through: the last billing day that has ended (yesterday): a month in progress is
    explained up to it, as its preview is; days after it are not charged yet.
    """
    zone = ZoneInfo(settings.timezone)
    has_jobs_tables = {"invoices", "invoice_lines", "month_closes"} <= set(inspect(engine).get_table_names())
    with engine.connect() as conn:
        account_id, created_at = find_account(conn, project_id)
        last = month.last_day if through is None else min(through, month.last_day)
        result = compute_chunk(conn, settings, month, Chunk.only(account_id), last=last)
        bad_rows = source_rejects(conn, settings, month.first_day, month.last_day)
        invoiced = _invoiced(conn, project_id, month) if has_jobs_tables else []
        closed = _is_closed(conn, month) if has_jobs_tables else False

    mine = result.projects["project_id"] == project_id
    assert mine.any(), "the project's own account chunk holds it"
    events = result.lifecycle.events
    events = events.loc[events["project_id"] == project_id].sort_values(
        ["occurred_at", "event_id"], kind="stable"
    )
    intervals = result.lifecycle.intervals
    intervals = intervals.loc[intervals["project_id"] == project_id]
    storage = result.storage.loc[
        (result.storage["project_id"] == project_id) & (result.storage["day"] <= day_number(last))
    ]
    cloud = result.cloud.loc[result.cloud["project_id"] == project_id]
    lo, hi = day_number(month.first_day), day_number(month.last_day)
    published = set(
        published_days(intervals.loc[intervals["state"] == "published"], lo, hi, zone)["day"].tolist()
    )

    days = _days(month, zone, created_at, events, storage, cloud, published, last)

    storage_units = int(storage["amount_units"].sum())
    compute = result.compute
    compute_units = 0
    if compute is not None and len(compute):
        found = compute.loc[compute["project_id"] == project_id, "compute_units"]
        compute_units = int(found.sum())
    refund_units = 0
    if result.refunds is not None and len(result.refunds):
        found = result.refunds.loc[result.refunds["project_id"] == project_id, "amount_units"]
        refund_units = int(found.sum())
    waiver = Waiver(compute_units, waiver_threshold_units(settings), storage_units, refund_units)

    totals: list[Line] = []
    if result.lines is not None and len(result.lines):
        mine_lines = result.lines.loc[result.lines["project_id"] == project_id]
        totals = _ordered(
            [
                Line(r.line_type, int(r.quantity_units), int(r.amount_units), str(r.unit_price))
                for r in mine_lines.itertuples(index=False)
            ]
        )

    rejected = pd.concat(
        [
            result.rejects.loc[
                (result.rejects["project_id"] == project_id)
                & (result.rejects["source_table"] != "project_events")
            ],
            bad_rows.loc[bad_rows["project_id"] == project_id],
        ],
        ignore_index=True,
    )

    explanation = Explanation(
        project_id=project_id,
        account_id=account_id,
        month=month,
        timezone=settings.timezone,
        created_at=created_at,
        days=days,
        waiver=waiver,
        totals=totals,
        invoiced=invoiced,
        rejected_rows=rejected.reset_index(drop=True),
        closed=closed,
    )
    explanation.notes.extend(_notes(explanation))
    return explanation


def _days(
    month: Month,
    zone: ZoneInfo,
    created_at: datetime,
    events: pd.DataFrame,
    storage: pd.DataFrame,
    cloud: pd.DataFrame,
    published: set[int],
    last: date,
) -> list[DayView]:
    notes = [
        EventNote(
            event_id=str(r.event_id),
            kind=str(r.kind),
            occurred_at=_naive(r.occurred_at),
            local_time=f"{_local(_naive(r.occurred_at), zone):%H:%M:%S}",
            accepted=bool(r.accepted),
            reason=str(r.reason),
        )
        for r in events.itertuples(index=False)
    ]
    transitions = [n for n in notes if n.accepted and n.kind in LIFECYCLE_KINDS]
    status_by_day = dict(zip(storage["day"].tolist(), storage["status"].tolist(), strict=True))
    amount_by_day = dict(zip(storage["day"].tolist(), storage["amount_units"].tolist(), strict=True))
    created_local = _local(created_at, zone)
    out = []
    for i in range((last - month.first_day).days + 1):  # days after `last` have not ended yet
        day = month.first_day + timedelta(days=i)
        n = day_number(day)
        start = local_midnight_utc(day, zone)
        end = local_midnight_utc(day + timedelta(days=1), zone)
        todays = [e for e in notes if start <= e.occurred_at < end]
        state, since = _state_at(end, created_at, transitions)
        created_today = start <= created_at < end
        active = n in status_by_day
        fees = [
            CloudFee(str(r.metric), str(r.line_type), int(r.quantity_units), int(r.amount_units))
            for r in cloud.loc[cloud["day"] == n]
            .sort_values("line_type", key=lambda s: s.map(LINE_RANK))
            .itertuples(index=False)
        ]
        out.append(
            DayView(
                day=day,
                active=active,
                state=state,
                why=_why(active, state, since, created_today, created_local, todays, zone),
                created_today=created_today,
                events=todays,
                storage_status=str(status_by_day.get(n, "")),
                storage_units=int(amount_by_day.get(n, 0)),
                published=n in published,
                cloud=fees,
            )
        )
    return out


def _state_at(
    instant: datetime, created_at: datetime, transitions: list[EventNote]
) -> tuple[str, EventNote | None]:
    """The lifecycle state just before `instant`, and the event that set it."""
    if created_at >= instant:
        return NOT_CREATED, None
    state, since = ACTIVE, None
    for e in transitions:
        if e.occurred_at >= instant:
            break
        state = {"archived": ARCHIVED, "restored": ACTIVE, "deleted": DELETED}[e.kind]
        since = e
    return state, since


def _why(
    active: bool,
    state: str,
    since: EventNote | None,
    created_today: bool,
    created_local: datetime,
    todays: list[EventNote],
    zone: ZoneInfo,
) -> str:
    parts = []
    if created_today:
        parts.append(f"created {created_local:%H:%M}")
    for e in todays:
        if e.accepted and e.kind in LIFECYCLE_KINDS:
            parts.append(f"{e.kind} {e.local_time[:5]}")
    if not parts:
        if state == NOT_CREATED:
            parts.append("not created yet")
        elif state == ACTIVE:
            parts.append("active")
        elif since is not None:
            parts.append(f"{state} since {_local(since.occurred_at, zone):%Y-%m-%d %H:%M}")
        else:
            parts.append(state)
    elif not active and state != NOT_CREATED and not any(p.startswith(state) for p in parts):
        parts.append(state)
    for e in todays:
        if e.accepted and e.kind not in LIFECYCLE_KINDS:
            parts.append(f"{e.kind} {e.local_time[:5]}")
        elif not e.accepted:
            parts.append(f"{e.kind} {e.local_time[:5]} rejected ({e.reason})")
    return "; ".join(parts)


def _invoiced(conn: Connection, project_id: str, month: Month) -> list[InvoicedLine]:
    il, inv = invoice_lines.c, invoices.c
    rows = conn.execute(
        select(
            il.invoice_id,
            inv.kind,
            inv.sequence,
            inv.status,
            il.line_type,
            il.quantity_units,
            il.unit_price,
            il.amount_units,
        )
        .join(invoices, inv.invoice_id == il.invoice_id)
        .where(il.project_id == project_id, il.period == str(month))
        .order_by(inv.sequence, il.invoice_id)
    )
    rank = {t: i for i, t in enumerate(LINE_ORDER)}
    found = [
        InvoicedLine(
            r.invoice_id,
            r.kind,
            int(r.sequence),
            r.status,
            r.line_type,
            int(r.quantity_units),
            r.unit_price,
            int(r.amount_units),
        )
        for r in rows
    ]
    return sorted(found, key=lambda x: (x.sequence, x.invoice_id, rank.get(x.line_type, 99)))


def _is_closed(conn: Connection, month: Month) -> bool:
    row = conn.execute(select(month_closes.c.period).where(month_closes.c.period == str(month))).first()
    return row is not None


def _notes(x: Explanation) -> list[str]:
    notes = []
    period = str(x.month)
    if not x.closed:
        if x.invoiced_totals:
            notes.append(f"month {period} is not closed; the invoice lines below may change")
        else:
            notes.append(
                f"month {period} is not closed: no invoice yet; these totals are what "
                f"`billing-jobs month-end --month {period}` would invoice now"
            )
    if any(line.status != "finalized" for line in x.invoiced):
        notes.append("draft invoice lines (an unfinished month-end run) are listed but not counted")
    if x.closed:
        if x.matches_invoices:
            notes.append("the invoices match the recomputation from the source data")
        else:
            diff = ", ".join(
                f"{d.line_type} {_signed(d.amount_units)}"
                + (f" ({_signed(d.quantity_units)} qty)" if d.quantity_units != d.amount_units else "")
                for d in x.differences
            )
            notes.append(
                f"the invoices differ from the recomputation ({diff}): the source data changed after "
                f"the last month-end run (late usage or back-dated events); "
                f"`billing-jobs month-end --month {period}` writes an adjustment invoice with exactly "
                f"these differences"
            )
    return notes


def _signed(units: int) -> str:
    text = format_units(units)
    return text if text.startswith("-") else f"+{text}"


# ---------------------------------------------------------------------------
# Plain data for --json
# ---------------------------------------------------------------------------


def _line_record(line: Line) -> dict[str, Any]:
    return {
        "line_type": line.line_type,
        "quantity": format_units(line.quantity_units),
        "amount": format_units(line.amount_units),
    }


def to_record(x: Explanation) -> dict[str, Any]:
    """The explanation as plain JSON-ready data; amounts as plain decimal strings."""
    zone = ZoneInfo(x.timezone)
    charged = [d for d in x.days if d.charged]
    return {
        "project_id": x.project_id,
        "account_id": x.account_id,
        "period": str(x.month),
        "timezone": x.timezone,
        "created_at": f"{x.created_at:%Y-%m-%dT%H:%M:%S}Z",
        "created_local": f"{_local(x.created_at, zone):%Y-%m-%d %H:%M:%S}",
        "days": [
            {
                "date": str(d.day),
                "active": d.active,
                "state": d.state,
                "why": d.why,
                "events": [
                    {
                        "event_id": e.event_id,
                        "kind": e.kind,
                        "occurred_at": f"{e.occurred_at:%Y-%m-%dT%H:%M:%S}Z",
                        "local_time": e.local_time,
                        "accepted": e.accepted,
                        "reason": e.reason or None,
                    }
                    for e in d.events
                ],
                "storage": d.storage_status or None,
                "free": d.free,
                "charged": d.charged,
                "cap_reached": d.cap_reached,
                "amount": format_units(d.storage_units),
                "published": d.published,
                "cloud": [
                    {
                        "metric": c.metric,
                        "line_type": c.line_type,
                        "quantity": format_units(c.quantity_units),
                        "amount": format_units(c.amount_units),
                    }
                    for c in d.cloud
                ],
            }
            for d in x.days
        ],
        "storage": {
            "active_days": sum(d.active for d in x.days),
            "charged_days": len(charged),
            "amount": format_units(sum(d.storage_units for d in x.days)),
        },
        "waiver": {
            "compute_total": format_units(x.waiver.compute_units),
            "threshold": None if x.waiver.threshold_units is None else format_units(x.waiver.threshold_units),
            "threshold_reached": x.waiver.reached,
            "refund_applies": x.waiver.applies,
            "refund": format_units(x.waiver.refund_units),
            "why": x.waiver.why,
        },
        "rejected_rows": [
            {
                "source_table": r.source_table,
                "source_id": r.source_id,
                "reason": r.reason,
                "detail": r.detail,
            }
            for r in x.rejected_rows.itertuples(index=False)
        ],
        "totals": [_line_record(t) | {"unit_price": t.unit_price} for t in x.totals],
        "invoiced": [
            {
                "invoice_id": i.invoice_id,
                "invoice_kind": i.invoice_kind,
                "sequence": i.sequence,
                "status": i.status,
                "line_type": i.line_type,
                "quantity": format_units(i.quantity_units),
                "unit_price": i.unit_price,
                "amount": format_units(i.amount_units),
            }
            for i in x.invoiced
        ],
        "invoiced_totals": [_line_record(t) for t in x.invoiced_totals],
        "differences": [_line_record(d) for d in x.differences],
        "matches_invoices": x.matches_invoices,
        "closed": x.closed,
        "notes": x.notes,
    }
