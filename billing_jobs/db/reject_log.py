"""The rejects' life after they are recorded: listed, resolved by a person, closed by a
run that no longer finds them, reopened when they come back (see docs/rejects.md).

Every change is one UPDATE guarded by the status it expects, so a person resolving a
reject and a run closing it at the same moment cannot overwrite each other.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, bindparam, func, select, update

from billing_jobs.db.billing_tables import rejects
from billing_jobs.db.source_tables import projects
from billing_jobs.db.sql import among
from billing_jobs.rules.rejects import (
    Examined,
    OpenReject,
    RejectStatus,
    closed_note,
    no_longer_found,
    reopened_note,
)

BATCH = 5_000


@dataclass(frozen=True)
class RejectRow:
    reject_id: str
    source_table: str
    source_id: str
    reason: str
    project_id: str | None
    period: str
    detail: str
    first_seen_at: datetime
    status: str
    resolved_at: datetime | None
    resolved_by: str | None
    resolution: str | None

    @property
    def sort_key(self) -> tuple[str, str, str, str]:
        """Code-point order, whatever the database's collation."""
        return (self.period, self.source_table, self.source_id, self.reason)


def _batches(values: Sequence[str]) -> Iterable[list[str]]:
    for start in range(0, len(values), BATCH):
        yield list(values[start : start + BATCH])


def read_rejects(
    conn: Connection,
    *,
    period: str | None = None,
    source_table: str | None = None,
    reason: str | None = None,
    statuses: Sequence[str] | None = None,
    ids: Sequence[str] | None = None,
) -> list[RejectRow]:
    """The rejects matching every filter given, in code-point order."""
    r = rejects.c
    where = []
    if period is not None:
        where.append(r.period == period)
    if source_table is not None:
        where.append(r.source_table == source_table)
    if reason is not None:
        where.append(r.reason == reason)
    if statuses is not None:
        where.append(r.status.in_(list(statuses)))
    if ids is not None:
        where.append(among(r.reject_id, list(ids)))
    columns = [getattr(r, name) for name in RejectRow.__dataclass_fields__]
    rows = [RejectRow(*row) for row in conn.execute(select(*columns).where(*where))]
    return sorted(rows, key=lambda row: row.sort_key)


def count_by_status(conn: Connection) -> dict[str, int]:
    r = rejects.c
    counts = {str(s): 0 for s in RejectStatus}
    for status, n in conn.execute(select(r.status, func.count()).group_by(r.status)):
        counts[str(status)] = int(n)
    return counts


def resolve(conn: Connection, ids: Sequence[str], *, by: str, note: str, now: datetime) -> list[str]:
    """Mark the open rejects among `ids` resolved; returns the ids this changed."""
    r = rejects.c
    changed: list[str] = []
    for batch in _batches(sorted(set(ids))):
        changed.extend(
            conn.execute(
                update(rejects)
                .where(among(r.reject_id, batch), r.status == RejectStatus.OPEN)
                .values(status=RejectStatus.RESOLVED, resolved_at=now, resolved_by=by, resolution=note)
                .returning(r.reject_id)
            ).scalars()
        )
    return sorted(changed)


def reopen_found(conn: Connection, ids: Sequence[str], *, run_id: str, now: datetime) -> int:
    """Closed rejects among `ids` (found again by run `run_id`) open again, with a note."""
    r = rejects.c
    back: list[tuple[str, str | None]] = []
    for batch in _batches(sorted(set(ids))):
        back.extend(
            conn.execute(
                select(r.reject_id, r.resolution).where(
                    among(r.reject_id, batch), r.status == RejectStatus.CLOSED
                )
            ).tuples()
        )
    if back:
        stmt = (
            update(rejects)
            .where(r.reject_id == bindparam("rid"), r.status == RejectStatus.CLOSED)
            .values(
                status=RejectStatus.OPEN, resolved_at=None, resolved_by=None, resolution=bindparam("note")
            )
        )
        conn.execute(stmt, [{"rid": rid, "note": reopened_note(run_id, now, before)} for rid, before in back])
    return len(back)


def close_unfound(
    conn: Connection,
    examined: Examined,
    found: Set[tuple[str, str, str]],
    *,
    job: str,
    run_id: str,
    now: datetime,
) -> int:
    """Close the open rejects of what the run re-examined (`examined`) that it did not
    find again (`found`: source_table, source_id, reason); returns how many."""
    r = rejects.c
    found = {(t, str(s), why) for t, s, why in found}
    candidates = [
        OpenReject(*row)
        for row in conn.execute(
            select(r.reject_id, r.source_table, r.source_id, r.reason, r.project_id).where(
                r.status == RejectStatus.OPEN,
                r.period == examined.period,
                r.source_table.in_(sorted(examined.tables)),
            )
        )
    ]
    if not candidates:
        return 0
    owners: dict[str, str] = {}
    if examined.accounts is not None:
        pids = sorted({c.project_id for c in candidates if c.project_id is not None})
        for batch in _batches(pids):
            query = select(projects.c.project_id, projects.c.account_id).where(
                among(projects.c.project_id, batch)
            )
            owners.update((pid, account) for pid, account in conn.execute(query))
    gone = no_longer_found(candidates, found, examined, owners)
    note = closed_note(job, run_id, examined.what)
    closed = 0
    for batch in _batches(gone):
        closed += (
            conn.execute(
                update(rejects)
                .where(among(r.reject_id, batch), r.status == RejectStatus.OPEN)
                .values(status=RejectStatus.CLOSED, resolved_at=now, resolved_by=job, resolution=note)
            ).rowcount
            or 0
        )
    return closed
