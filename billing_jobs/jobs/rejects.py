"""Rejects for people: list them, resolve them (docs/rejects.md).

Runs record rejects, close those they no longer find and reopen those that come
back (`db.reject_log`); this is what `billing-jobs rejects` does besides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine

from billing_jobs.db import reject_log
from billing_jobs.db.engine import schema_is_current
from billing_jobs.db.reject_log import RejectRow
from billing_jobs.rules.rejects import RejectStatus

STATUS_FILTERS = {
    "open": (RejectStatus.OPEN,),
    "resolved": (RejectStatus.RESOLVED,),
    "closed": (RejectStatus.CLOSED,),
    "all": None,
}


class SchemaNotCurrent(RuntimeError):
    """The jobs' tables do not exist or are not migrated to the newest revision."""


class UnknownRejects(ValueError):
    """Ids that name no reject; nothing was changed."""

    def __init__(self, ids: Sequence[str]) -> None:
        super().__init__(f"unknown reject id(s): {', '.join(ids)}; nothing was changed")
        self.ids = list(ids)


@dataclass(frozen=True)
class Resolved:
    resolved: list[RejectRow]  # resolved by this call
    already: list[RejectRow]  # resolved or closed before: left as they were


def _check_schema(engine: Engine) -> None:
    if not schema_is_current(engine):
        raise SchemaNotCurrent(
            "the jobs' tables do not exist or are not at the newest schema: run `billing-jobs db upgrade`"
        )


def list_rejects(
    engine: Engine,
    *,
    period: str | None = None,
    source_table: str | None = None,
    reason: str | None = None,
    status: str = "open",
) -> list[RejectRow]:
    _check_schema(engine)
    with engine.connect() as conn:
        return reject_log.read_rejects(
            conn, period=period, source_table=source_table, reason=reason, statuses=STATUS_FILTERS[status]
        )


def resolve_rejects(engine: Engine, ids: Sequence[str], *, by: str, note: str, now: datetime) -> Resolved:
    """Resolve the open rejects `ids` (all known, else `UnknownRejects` and no change),
    recording `by`, `now` (naive UTC) and `note`. Rejects resolved or closed before keep
    their first resolution."""
    _check_schema(engine)
    wanted = sorted(set(ids))
    with engine.begin() as conn:
        rows = {row.reject_id: row for row in reject_log.read_rejects(conn, ids=wanted)}
        unknown = [i for i in wanted if i not in rows]
        if unknown:
            raise UnknownRejects(unknown)
        changed = set(reject_log.resolve(conn, wanted, by=by, note=note, now=now))
        after = {row.reject_id: row for row in reject_log.read_rejects(conn, ids=wanted)}
    return Resolved(
        resolved=[after[i] for i in wanted if i in changed],
        already=[after[i] for i in wanted if i not in changed],
    )
