"""Project lifecycle: states from `projects` and `project_events`, as intervals.

A project is active from its creation. Its events, in `(occurred_at, event_id)`
order, move it between active, archived and deleted, and turn its published flag
on and off (billing-rules.md, Project lifecycle). An event that is not allowed in
the project's state at that moment is rejected and changes nothing.

The state machine runs over all projects at once: step k applies every
project's k-th event as one vectorized operation, so the number of Python steps
is the largest number of events of any one project, not the number of events.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from billing_jobs.frames import pd

ACTIVE, ARCHIVED, DELETED = 0, 1, 2
EVENT_KINDS = ("archived", "restored", "deleted", "published", "unpublished")

# Reject reasons (stable codes, stored with every rejected row).
UNKNOWN_PROJECT = "unknown_project"
UNKNOWN_KIND = "unknown_event_kind"
BEFORE_CREATION = "event_before_creation"
AFTER_DELETION = "event_after_deletion"
NOT_ALLOWED = "event_not_allowed"

# An open interval end: far enough in the future for any billing period.
OPEN_END = pd.Timestamp("2200-01-01")


@dataclass(frozen=True)
class Lifecycle:
    """The outcome of applying the events.

    intervals: project_id, state ('active' | 'published'), start, end (naive UTC,
               half-open, `OPEN_END` when still open).
    events:    every event with `accepted` (bool) and `reason` ('' when accepted).
    """

    intervals: pd.DataFrame
    events: pd.DataFrame

    @property
    def rejected(self) -> pd.DataFrame:
        return self.events.loc[~self.events["accepted"]]


def _empty_intervals() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "project_id": pd.Series(dtype=object),
            "state": pd.Series(dtype=object),
            "start": pd.Series(dtype="datetime64[us]"),
            "end": pd.Series(dtype="datetime64[us]"),
        }
    )


def build_lifecycle(projects: pd.DataFrame, events: pd.DataFrame) -> Lifecycle:
    """Apply events to projects.

    projects: project_id, created_at (naive UTC).
    events:   event_id, project_id, occurred_at (naive UTC), kind.
    """
    n_projects = len(projects)
    created = pd.to_datetime(projects["created_at"]).astype("datetime64[us]").to_numpy()
    project_ids = projects["project_id"].to_numpy(dtype=object)

    ev = events[["event_id", "project_id", "occurred_at", "kind"]].copy()
    ev["occurred_at"] = pd.to_datetime(ev["occurred_at"]).astype("datetime64[us]")
    ev = ev.sort_values(["project_id", "occurred_at", "event_id"], kind="stable")
    ev = ev.reset_index(drop=True)
    code = pd.Index(project_ids).get_indexer(ev["project_id"])
    kind = ev["kind"].astype(object).to_numpy()
    kind_code = pd.Index(EVENT_KINDS).get_indexer(kind)
    when = ev["occurred_at"].to_numpy()

    reason = np.full(len(ev), "", dtype=object)
    known = code >= 0
    reason[~known] = UNKNOWN_PROJECT
    reason[known & (kind_code < 0)] = UNKNOWN_KIND
    early = known & (kind_code >= 0)
    early[early] = when[early] < created[code[early]]
    reason[early] = BEFORE_CREATION
    candidate = reason == ""

    # Step k applies each project's k-th candidate event, for all projects at once.
    cand_idx = np.flatnonzero(candidate)
    rank = pd.Series(code[cand_idx]).groupby(code[cand_idx]).cumcount().to_numpy()
    state = np.zeros(n_projects, dtype=np.int8)
    published = np.zeros(n_projects, dtype=bool)
    accepted = np.zeros(len(ev), dtype=bool)
    before_state = np.zeros(len(ev), dtype=np.int8)
    before_pub = np.zeros(len(ev), dtype=bool)
    order = np.argsort(rank, kind="stable")
    bounds = np.searchsorted(rank[order], np.arange(rank.max() + 2)) if len(rank) else [0]
    for k in range(len(bounds) - 1):
        rows = cand_idx[order[bounds[k] : bounds[k + 1]]]
        p = code[rows]
        kc = kind_code[rows]
        s = state[p]
        pub = published[p]
        before_state[rows] = s
        before_pub[rows] = pub
        ok = np.select(
            [kc == 0, kc == 1, kc == 2, kc == 3, kc == 4],
            [s == ACTIVE, s == ARCHIVED, s != DELETED, (s != DELETED) & ~pub, (s != DELETED) & pub],
            default=False,
        )
        after_deleted = s == DELETED
        reason[rows[~ok & after_deleted]] = AFTER_DELETION
        reason[rows[~ok & ~after_deleted]] = NOT_ALLOWED
        accepted[rows[ok]] = True
        pg = p[ok]
        kg = kc[ok]
        state[pg[kg == 0]] = ARCHIVED
        state[pg[kg == 1]] = ACTIVE
        state[pg[kg == 2]] = DELETED
        published[pg[kg == 2]] = False
        published[pg[kg == 3]] = True
        published[pg[kg == 4]] = False

    ev["accepted"] = accepted
    ev["reason"] = reason
    intervals = _intervals(project_ids, created, code, kind_code, when, accepted, before_state, before_pub)
    return Lifecycle(intervals=intervals, events=ev)


def _intervals(
    project_ids: np.ndarray,
    created: np.ndarray,
    code: np.ndarray,
    kind_code: np.ndarray,
    when: np.ndarray,
    accepted: np.ndarray,
    before_state: np.ndarray,
    before_pub: np.ndarray,
) -> pd.DataFrame:
    """Interval boundaries from the accepted transitions, paired in time order."""
    if len(project_ids) == 0:
        return _empty_intervals()
    a = accepted
    kc, p, t, bs, bp = kind_code[a], code[a], when[a], before_state[a], before_pub[a]

    # Active: opens at creation and on `restored`; closes on `archived`, and on
    # `deleted` of an active project.
    act_open_p = np.concatenate([np.arange(len(project_ids)), p[kc == 1]])
    act_open_t = np.concatenate([created, t[kc == 1]])
    close = (kc == 0) | ((kc == 2) & (bs == ACTIVE))
    active = _pair(act_open_p, act_open_t, p[close], t[close])

    # Published: opens on `published`; closes on `unpublished` and on deletion
    # of a published project.
    pub_close = (kc == 4) | ((kc == 2) & bp)
    published = _pair(p[kc == 3], t[kc == 3], p[pub_close], t[pub_close])

    frames = []
    for name, (pp, start, end) in (("active", active), ("published", published)):
        frames.append(
            pd.DataFrame(
                {
                    "project_id": project_ids[pp],
                    "state": name,
                    "start": start.astype("datetime64[us]"),
                    "end": end.astype("datetime64[us]"),
                }
            )
        )
    out = pd.concat(frames, ignore_index=True)
    return out if len(out) else _empty_intervals()


def _pair(
    open_p: np.ndarray, open_t: np.ndarray, close_p: np.ndarray, close_t: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pair each opening with the next closing of the same project.

    The state machine guarantees openings and closings alternate per project,
    starting with an opening; an opening without a closing stays open.
    """
    open_df = pd.DataFrame({"p": open_p, "t": open_t}).sort_values(["p", "t"], kind="stable")
    close_df = pd.DataFrame({"p": close_p, "t": close_t}).sort_values(["p", "t"], kind="stable")
    open_df["n"] = open_df.groupby("p").cumcount()
    close_df["n"] = close_df.groupby("p").cumcount()
    merged = open_df.merge(close_df, on=["p", "n"], how="left", suffixes=("", "_end"))
    end = merged["t_end"].fillna(OPEN_END).to_numpy(dtype="datetime64[us]")
    return (
        merged["p"].to_numpy(dtype=np.int64),
        merged["t"].to_numpy(dtype="datetime64[us]"),
        end,
    )
