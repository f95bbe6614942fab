"""Rejects' vocabulary: their statuses, short ids and the notes runs leave on them.

A reject is one source row that cannot be billed, for one reason. It is `open`
until someone resolves it (`resolved`: who, when, why) or a later run that
re-examined its rows no longer finds it (`closed`, by that run). A closed reject
that a later run finds again is `open` again, with a note saying so.

Pure: no database, no clock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from billing_jobs.rules.codes import ALPHABET

ID_CHARS = 12  # 12 x 5 bits = 60 bits: no two of millions of rejects share an id in practice


class RejectStatus(StrEnum):
    OPEN = "open"
    RESOLVED = "resolved"  # by a person, with a note
    CLOSED = "closed"  # by a run that no longer found it


def reject_id(source_table: str, source_id: str, reason: str) -> str:
    """The reject's short id: the same (table, row, reason) always gives the same id.

    Twelve characters of an alphabet without look-alikes (no 0/O, 1/I), from a
    SHA-256 of the three parts.
    """
    digest = hashlib.sha256("\x1f".join((source_table, source_id, reason)).encode()).digest()
    number = int.from_bytes(digest[:8], "big") >> (64 - 5 * ID_CHARS)
    chars = []
    for _ in range(ID_CHARS):
        number, k = divmod(number, len(ALPHABET))
        chars.append(ALPHABET[k])
    return "".join(reversed(chars))


def typed_id(text: str) -> str:
    """An id as typed by a person: case and dashes or spaces do not matter."""
    return text.replace("-", "").replace(" ", "").upper()


def _at(now: datetime) -> str:
    return f"{now:%Y-%m-%d %H:%M:%S} UTC"


def closed_note(job: str, run_id: str, examined: str) -> str:
    return f"no longer found by {job} run {run_id} ({examined})"


def reopened_note(run_id: str, now: datetime, before: str | None) -> str:
    note = f"reopened: found again by run {run_id} at {_at(now)}"
    return f"{note}; was closed: {before}" if before else note


@dataclass(frozen=True)
class Examined:
    """What a run re-examined wholly, so that any open reject in it that the run did
    not find again is gone: the rejects of `period` from `tables`, of every project
    (`accounts` None) or only of the projects of `accounts` and of projects that do
    not exist (which platform-wide scans look at). `what` says it in the note."""

    period: str
    tables: frozenset[str]
    what: str
    accounts: frozenset[str] | None = None


@dataclass(frozen=True)
class OpenReject:
    reject_id: str
    source_table: str
    source_id: str
    reason: str
    project_id: str | None


def no_longer_found(
    candidates: Iterable[OpenReject],
    found: Set[tuple[str, str, str]],
    examined: Examined,
    owners: Mapping[str, str],
) -> list[str]:
    """The ids of the open rejects of `examined` (already of its period and tables) that
    the run did not find again. owners: project_id -> account_id of the projects that
    exist (needed only when `examined.accounts` is set)."""
    out = []
    for r in candidates:
        if (r.source_table, r.source_id, r.reason) in found:
            continue
        owner = owners.get(r.project_id) if r.project_id is not None else None
        if examined.accounts is not None and owner is not None and owner not in examined.accounts:
            continue  # a project of accounts the run did not look at
        out.append(r.reject_id)
    return sorted(out)
