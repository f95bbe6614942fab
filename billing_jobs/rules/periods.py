"""Charges as periods: what the charge store holds, and how a run's charges change it.

A period is one project's charge of one type on consecutive days of one month, with
the same account, daily quantity and daily amount on each day: `project_id,
charge_type, first_day, last_day, account_id, quantity_units, amount_units` (days
are day numbers, both ends included; quantity and amount are per day). The store
holds periods in their canonical form: no two of a (project, charge type) overlap,
and no two that touch could be one. A set of daily charges has exactly one
canonical form, and the form gives the days back exactly, so comparing periods
compares every day.

Pure functions over DataFrames, vectorized over whole columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

VALUES = ["account_id", "quantity_units", "amount_units"]
KEY = ["project_id", "charge_type", "first_day"]
COLUMNS = ["project_id", "charge_type", "first_day", "last_day", *VALUES]
INTS = ("first_day", "last_day", "quantity_units", "amount_units")
DAY_COLUMNS = ["project_id", "account_id", "charge_type", "day", "quantity_units", "amount_units"]


def empty() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "project_id": pd.Series(dtype=object),
            "charge_type": pd.Series(dtype=object),
            "first_day": pd.Series(dtype=np.int64),
            "last_day": pd.Series(dtype=np.int64),
            "account_id": pd.Series(dtype=object),
            "quantity_units": pd.Series(dtype=np.int64),
            "amount_units": pd.Series(dtype=np.int64),
        }
    )


def _month_of(days: np.ndarray) -> np.ndarray:
    return np.asarray(days, dtype=np.int64).astype("datetime64[D]").astype("datetime64[M]").astype(np.int64)


def canonical(periods: pd.DataFrame) -> pd.DataFrame:
    """Periods (COLUMNS, not overlapping within a project and charge type) merged where
    they touch with equal values in the same month: the store's canonical form."""
    if periods.empty:
        return empty()
    pcode, _ = pd.factorize(periods["project_id"], sort=True)
    tcode, _ = pd.factorize(periods["charge_type"], sort=True)
    acode, _ = pd.factorize(periods["account_id"], sort=True)
    lo = periods["first_day"].to_numpy(dtype=np.int64)
    hi = periods["last_day"].to_numpy(dtype=np.int64)
    order = np.lexsort((lo, tcode, pcode))
    p, t, a, f, e = pcode[order], tcode[order], acode[order], lo[order], hi[order]
    q = periods["quantity_units"].to_numpy(dtype=np.int64)[order]
    m = periods["amount_units"].to_numpy(dtype=np.int64)[order]
    month = _month_of(f)
    start = np.ones(len(order), dtype=bool)
    start[1:] = (
        (p[1:] != p[:-1])
        | (t[1:] != t[:-1])
        | (f[1:] != e[:-1] + 1)
        | (a[1:] != a[:-1])
        | (q[1:] != q[:-1])
        | (m[1:] != m[:-1])
        | (month[1:] != month[:-1])
    )
    first = np.flatnonzero(start)
    last = np.append(first[1:], len(order)) - 1
    picked = order[first]
    return pd.DataFrame(
        {
            "project_id": periods["project_id"].to_numpy(dtype=object)[picked],
            "charge_type": periods["charge_type"].to_numpy(dtype=object)[picked],
            "first_day": f[first],
            "last_day": e[last],
            "account_id": periods["account_id"].to_numpy(dtype=object)[picked],
            "quantity_units": q[first],
            "amount_units": m[first],
        }
    )


def from_days(charges: pd.DataFrame) -> pd.DataFrame:
    """Daily charges (DAY_COLUMNS, one row per project, charge type and day) as
    canonical periods."""
    if charges.empty:
        return empty()
    day = charges["day"].to_numpy(dtype=np.int64)
    return canonical(
        pd.DataFrame(
            {
                "project_id": charges["project_id"].to_numpy(dtype=object),
                "charge_type": charges["charge_type"].to_numpy(dtype=object),
                "first_day": day,
                "last_day": day,
                "account_id": charges["account_id"].to_numpy(dtype=object),
                "quantity_units": charges["quantity_units"].to_numpy(dtype=np.int64),
                "amount_units": charges["amount_units"].to_numpy(dtype=np.int64),
            }
        )
    )


def to_days(periods: pd.DataFrame) -> pd.DataFrame:
    """Periods back as one row per day (DAY_COLUMNS)."""
    if periods.empty:
        return pd.DataFrame({c: pd.Series(dtype=np.int64 if c in ("day",) else object) for c in DAY_COLUMNS})
    lo = periods["first_day"].to_numpy(dtype=np.int64)
    n = periods["last_day"].to_numpy(dtype=np.int64) - lo + 1
    rows = np.repeat(np.arange(len(periods)), n)
    offset = np.arange(len(rows)) - np.repeat(np.cumsum(n) - n, n)
    return pd.DataFrame(
        {
            "project_id": periods["project_id"].to_numpy(dtype=object)[rows],
            "account_id": periods["account_id"].to_numpy(dtype=object)[rows],
            "charge_type": periods["charge_type"].to_numpy(dtype=object)[rows],
            "day": lo[rows] + offset,
            "quantity_units": periods["quantity_units"].to_numpy(dtype=np.int64)[rows],
            "amount_units": periods["amount_units"].to_numpy(dtype=np.int64)[rows],
        }
    )


def outside(periods: pd.DataFrame, lo: np.ndarray, hi: np.ndarray) -> pd.DataFrame:
    """What of each period lies outside its window lo..hi (arrays, one per period): the
    part before it and the part after it, each where there is one."""
    f = periods["first_day"].to_numpy(dtype=np.int64)
    e = periods["last_day"].to_numpy(dtype=np.int64)
    before = f < lo
    after = e > hi
    parts = [
        periods.loc[before].assign(last_day=np.minimum(e, lo - 1)[before]),
        periods.loc[after].assign(first_day=np.maximum(f, hi + 1)[after]),
    ]
    return pd.concat([p[COLUMNS] for p in parts], ignore_index=True)


@dataclass(frozen=True)
class Change:
    """How stored periods become the wanted ones: rows to delete, then rows to insert."""

    delete: pd.DataFrame  # COLUMNS, as stored
    insert: pd.DataFrame  # COLUMNS

    @property
    def empty(self) -> bool:
        return bool(self.delete.empty and self.insert.empty)


def change(stored: pd.DataFrame, truth: pd.DataFrame, lo: np.ndarray, hi: np.ndarray) -> Change:
    """The change that makes `stored` say `truth` inside each stored period's window.

    stored: the stored periods a run may touch (COLUMNS): every one that overlaps or
    touches the window of its charge type; lo, hi: each stored period's window.
    truth: the canonical periods the rules give inside the windows. What lies outside
    a window is kept; periods that touch across a window's edge are merged. A stored
    period the result holds unchanged is neither deleted nor inserted.
    """
    wanted = canonical(pd.concat([outside(stored, lo, hi), truth[COLUMNS]], ignore_index=True))
    if stored.empty:
        return Change(delete=empty(), insert=wanted)
    # Rows are unique on each side, so a row equal to its neighbour once all rows are
    # sorted on every column is on both sides. Integer codes keep the sort light.
    both = pd.concat([stored[COLUMNS], wanted], ignore_index=True)
    codes = [
        both[c].to_numpy(dtype=np.int64) if c in INTS else pd.factorize(both[c])[0].astype(np.int64)
        for c in COLUMNS
    ]
    order = np.lexsort(codes[::-1])
    same = np.ones(len(order) - 1, dtype=bool)
    for column in codes:
        ranked = column[order]
        same &= ranked[1:] == ranked[:-1]
    paired = np.zeros(len(order), dtype=bool)
    paired[1:] |= same
    paired[:-1] |= same
    matched = np.empty(len(order), dtype=bool)
    matched[order] = paired
    n = len(stored)
    delete = stored.loc[~matched[:n], COLUMNS].reset_index(drop=True)
    insert = wanted.loc[~matched[n:]].reset_index(drop=True)
    return Change(delete=delete, insert=insert)
