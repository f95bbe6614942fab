"""Charges as periods: what the charge store holds, and how a run's charges change it.

A period is one project's charges of one type on days of one month, for one account,
in one of two forms:

- **a run** (`daily` None): consecutive days first_day..last_day with the same daily
  quantity and amount (`quantity_units`, `amount_units` are per day). The storage fee
  is stored so: an always-active project's month is one row.
- **a month** (`daily` set): every day a charge of that type has in the month, for
  that account, in one row (charge types whose amounts differ from day to day: the
  cloud fees). `daily` lists each day's values as `offset quantity amount` triples
  (offset from first_day, units), in day order, separated by single spaces;
  first_day..last_day are the first and last day charged, `quantity_units` and
  `amount_units` the month's totals, `days` the number of days charged.

The columns are `project_id, charge_type, first_day, last_day, days, account_id,
quantity_units, amount_units, daily`; days are day numbers, both ends included. The
store holds periods in their canonical form: runs of a (project, charge type) do not
overlap and no two that touch could be one; a month form is one row per (project,
charge type, month, account). A set of daily charges has exactly one canonical form,
and the form gives the days back exactly, so comparing periods compares every day.

Pure functions over DataFrames, vectorized over whole columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from billing_jobs.frames import pd
from billing_jobs.rules.groups import together
from billing_jobs.rules.int_texts import group_texts, integers
from billing_jobs.rules.invoice import STORAGE_FEE

VALUES = ["account_id", "quantity_units", "amount_units"]
KEY = ["project_id", "charge_type", "first_day"]
COLUMNS = ["project_id", "charge_type", "first_day", "last_day", "days", *VALUES, "daily"]
INTS = ("first_day", "last_day", "days", "quantity_units", "amount_units")
DAY_COLUMNS = ["project_id", "account_id", "charge_type", "day", "quantity_units", "amount_units"]


def empty() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=np.int64 if c in INTS else object) for c in COLUMNS})


def monthly(charge_types: pd.Series) -> np.ndarray:
    """Which charge types are stored in the month form (every type but the storage fee)."""
    kinds: np.ndarray = (charge_types != STORAGE_FEE).to_numpy(dtype=bool)
    return kinds


def _month_of(days: np.ndarray) -> np.ndarray:
    return np.asarray(days, dtype=np.int64).astype("datetime64[D]").astype("datetime64[M]").astype(np.int64)


def _codes(values: pd.Series) -> np.ndarray:
    codes, _ = pd.factorize(values, sort=True)
    out: np.ndarray = codes.astype(np.int64)
    return out


def canonical(periods: pd.DataFrame) -> pd.DataFrame:
    """Runs (COLUMNS but `days` and `daily` may be missing; not overlapping within a
    project and charge type) merged where they touch with equal values in the same
    month: the canonical form of runs."""
    if periods.empty:
        return empty()
    pcode = _codes(periods["project_id"])
    tcode = _codes(periods["charge_type"])
    acode = _codes(periods["account_id"])
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
            "days": e[last] - f[first] + 1,
            "account_id": periods["account_id"].to_numpy(dtype=object)[picked],
            "quantity_units": q[first],
            "amount_units": m[first],
            "daily": np.full(len(first), None, dtype=object),
        }
    )


def _runs_of_days(charges: pd.DataFrame) -> pd.DataFrame:
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


def months_of_days(charges: pd.DataFrame) -> pd.DataFrame:
    """Daily charges (one per project, charge type and day) as month forms: one row per
    (project, charge type, month, account), in the order of those keys."""
    if charges.empty:
        return empty()
    day = charges["day"].to_numpy(dtype=np.int64)
    project = charges["project_id"].to_numpy(dtype=object)
    kind = charges["charge_type"].to_numpy(dtype=object)
    account = charges["account_id"].to_numpy(dtype=object)
    month = _month_of(day)
    keys = (project, kind, month, account)
    first = together(keys, day)
    grouped = first is not None
    if first is None:  # not grouped already: sorted
        p, t, a = _codes(charges["project_id"]), _codes(charges["charge_type"]), _codes(charges["account_id"])
        order = np.lexsort((day, a, month, t, p))
        start = np.zeros(len(order), dtype=bool)
        start[0] = True
        for key in (p[order], t[order], month[order], a[order]):
            start[1:] |= key[1:] != key[:-1]
        first = np.flatnonzero(start)
    else:
        order = np.arange(len(day))
    d = day[order]
    group = np.repeat(np.arange(len(first)), np.diff(np.append(first, len(order))))
    q = charges["quantity_units"].to_numpy(dtype=np.int64)[order]
    m = charges["amount_units"].to_numpy(dtype=np.int64)[order]
    ends = np.append(first[1:], len(order)) - 1
    picked = order[first]
    months = pd.DataFrame(
        {
            "project_id": project[picked],
            "charge_type": kind[picked],
            "first_day": d[first],
            "last_day": d[ends],
            "days": ends - first + 1,
            "account_id": account[picked],
            "quantity_units": np.add.reduceat(q, first),
            "amount_units": np.add.reduceat(m, first),
            "daily": _encode(d - d[first][group], q, m, first),
        }
    )
    if not grouped:
        return months
    # The groups in the order of their keys, as the sort above gives them.
    ranked = np.lexsort(
        (
            _codes(months["account_id"]),
            _month_of(months["first_day"].to_numpy(dtype=np.int64)),
            _codes(months["charge_type"]),
            _codes(months["project_id"]),
        )
    )
    return months.iloc[ranked].reset_index(drop=True)


def _encode(offset: np.ndarray, quantity: np.ndarray, amount: np.ndarray, first: np.ndarray) -> np.ndarray:
    """The `daily` text of each group of days (groups start at the indexes `first`),
    made a column at a time (`rules.int_texts.group_texts`)."""
    return np.array(group_texts(np.column_stack((offset, quantity, amount)), first), dtype=object)


def from_days(charges: pd.DataFrame) -> pd.DataFrame:
    """Daily charges (DAY_COLUMNS, one row per project, charge type and day) as
    canonical periods."""
    if charges.empty:
        return empty()
    month_form = monthly(charges["charge_type"])
    parts = [_runs_of_days(charges.loc[~month_form]), months_of_days(charges.loc[month_form])]
    return joined(parts)


def joined(parts: list[pd.DataFrame]) -> pd.DataFrame:
    found = [p[COLUMNS] for p in parts if len(p)]
    if not found:
        return empty()
    return found[0].reset_index(drop=True) if len(found) == 1 else pd.concat(found, ignore_index=True)


def _days_of_runs(runs: pd.DataFrame) -> pd.DataFrame:
    lo = runs["first_day"].to_numpy(dtype=np.int64)
    n = runs["last_day"].to_numpy(dtype=np.int64) - lo + 1
    rows = np.repeat(np.arange(len(runs)), n)
    offset = np.arange(len(rows)) - np.repeat(np.cumsum(n) - n, n)
    return pd.DataFrame(
        {
            "project_id": runs["project_id"].to_numpy(dtype=object)[rows],
            "account_id": runs["account_id"].to_numpy(dtype=object)[rows],
            "charge_type": runs["charge_type"].to_numpy(dtype=object)[rows],
            "day": lo[rows] + offset,
            "quantity_units": runs["quantity_units"].to_numpy(dtype=np.int64)[rows],
            "amount_units": runs["amount_units"].to_numpy(dtype=np.int64)[rows],
        }
    )


def _days_of_months(months: pd.DataFrame) -> pd.DataFrame:
    n = months["days"].to_numpy(dtype=np.int64)
    try:
        flat = integers(" ".join(months["daily"].tolist()))
    except ValueError:
        flat = np.empty(0, dtype=np.int64)
    if len(flat) != 3 * int(n.sum()):
        raise ValueError(_unreadable(months))
    values = flat.reshape(-1, 3)
    rows = np.repeat(np.arange(len(months)), n)
    return pd.DataFrame(
        {
            "project_id": months["project_id"].to_numpy(dtype=object)[rows],
            "account_id": months["account_id"].to_numpy(dtype=object)[rows],
            "charge_type": months["charge_type"].to_numpy(dtype=object)[rows],
            "day": months["first_day"].to_numpy(dtype=np.int64)[rows] + values[:, 0],
            "quantity_units": values[:, 1],
            "amount_units": values[:, 2],
        }
    )


def _unreadable(months: pd.DataFrame) -> str:
    """Which stored month row cannot be read back (an edit outside the jobs), named."""
    for row in months.itertuples(index=False):
        tokens = str(row.daily).split()
        if len(tokens) != 3 * int(row.days) or not all(t.lstrip("-").isdigit() for t in tokens):
            first = np.datetime64(int(row.first_day), "D")
            return (
                f"charge_periods row (project {row.project_id}, {row.charge_type}, first_day {first}) "
                f"does not hold {int(row.days)} days as 'offset quantity amount' in `daily`: "
                "it was changed outside the jobs; a month-end of its month rewrites it"
            )
    return "a stored month of charges cannot be read back"


def to_days(periods: pd.DataFrame) -> pd.DataFrame:
    """Periods back as one row per day (DAY_COLUMNS)."""
    if periods.empty:
        return pd.DataFrame({c: pd.Series(dtype=np.int64 if c == "day" else object) for c in DAY_COLUMNS})
    month_form = periods["daily"].notna().to_numpy(dtype=bool)
    if not month_form.any():
        return _days_of_runs(periods)
    if month_form.all():
        return _days_of_months(periods)
    return pd.concat(
        [_days_of_runs(periods.loc[~month_form]), _days_of_months(periods.loc[month_form])], ignore_index=True
    )


def outside(runs: pd.DataFrame, lo: np.ndarray, hi: np.ndarray) -> pd.DataFrame:
    """What of each run lies outside its window lo..hi (arrays, one per run): the part
    before it and the part after it, each where there is one."""
    f = runs["first_day"].to_numpy(dtype=np.int64)
    e = runs["last_day"].to_numpy(dtype=np.int64)
    before = f < lo
    after = e > hi
    parts = [
        runs.loc[before].assign(last_day=np.minimum(e, lo - 1)[before]),
        runs.loc[after].assign(first_day=np.maximum(f, hi + 1)[after]),
    ]
    return pd.concat([p[COLUMNS] for p in parts], ignore_index=True)


def _month_keys(frame: pd.DataFrame) -> pd.MultiIndex:
    return pd.MultiIndex.from_arrays(
        [
            frame["project_id"].to_numpy(dtype=object),
            frame["charge_type"].to_numpy(dtype=object),
            frame["account_id"].to_numpy(dtype=object),
            _month_of(frame["first_day"].to_numpy(dtype=np.int64)),
        ]
    )


def _appended(stored: pd.DataFrame, truth: pd.DataFrame, lo: np.ndarray) -> tuple[np.ndarray, pd.DataFrame]:
    """The nightly's common case without opening a stored month: the truth's days of a
    (project, charge type, month, account) that come after every day stored for it
    (the stored month ends before its window) appended to its text. Returns which
    truth rows were appended and the stored rows they extend, as extended."""
    none = np.zeros(len(truth), dtype=bool)
    if truth.empty or stored.empty or not bool((stored["last_day"].to_numpy(dtype=np.int64) < lo).any()):
        return none, empty()  # no stored month ends before its window (a month-end's)
    keys = _month_keys(stored)
    if not keys.is_unique:
        return none, empty()
    at = keys.get_indexer(_month_keys(truth))
    found = at >= 0
    before = np.zeros(len(truth), dtype=bool)
    before[found] = stored["last_day"].to_numpy(dtype=np.int64)[at[found]] < lo[at[found]]
    if not before.any():
        return none, empty()
    rows, base = truth.loc[before], stored.iloc[at[before]].reset_index(drop=True)
    days = _days_of_months(rows)
    n = rows["days"].to_numpy(dtype=np.int64)
    first = np.append(0, np.cumsum(n)[:-1])
    start = np.repeat(base["first_day"].to_numpy(dtype=np.int64), n)
    tail = _encode(
        days["day"].to_numpy(dtype=np.int64) - start,
        days["quantity_units"].to_numpy(dtype=np.int64),
        days["amount_units"].to_numpy(dtype=np.int64),
        first,
    )
    extended = base.assign(
        last_day=rows["last_day"].to_numpy(dtype=np.int64),
        days=base["days"].to_numpy(dtype=np.int64) + n,
        quantity_units=base["quantity_units"].to_numpy(dtype=np.int64)
        + rows["quantity_units"].to_numpy(dtype=np.int64),
        amount_units=base["amount_units"].to_numpy(dtype=np.int64)
        + rows["amount_units"].to_numpy(dtype=np.int64),
        daily=[f"{a} {b}" for a, b in zip(base["daily"].tolist(), tail.tolist(), strict=True)],
    )
    return before, extended


def _wanted_months(stored: pd.DataFrame, truth: pd.DataFrame, lo: np.ndarray, hi: np.ndarray) -> pd.DataFrame:
    """The month forms wanted: the stored days outside each window with the truth's
    days inside. A stored month is opened only when it has days inside its window or
    the truth has days for its (project, charge type, month, account) that do not all
    come after its last day; any other is kept as it is, or extended."""
    stored = stored.reset_index(drop=True)
    truth = truth.reset_index(drop=True)
    appended, extended = _appended(stored, truth, lo)
    if appended.any():
        stored_keys = _month_keys(stored)
        done = stored_keys.isin(_month_keys(extended))
        rest = _wanted_months(stored.loc[~done], truth.loc[~appended], lo[~done], hi[~done])
        return joined([rest, extended])
    f = stored["first_day"].to_numpy(dtype=np.int64)
    e = stored["last_day"].to_numpy(dtype=np.int64)
    reaches = (f <= hi) & (e >= lo)
    if len(truth) and not bool(reaches.all()):
        reaches |= _month_keys(stored).isin(_month_keys(truth))
    opened = stored.loc[reaches]
    if opened.empty:
        return joined([stored, truth])
    inside_all = (f >= lo) & (e <= hi)
    if bool(inside_all[reaches].all()):
        kept_days = _days_of_runs(empty())
    else:
        days = _days_of_months(opened)
        n = opened["days"].to_numpy(dtype=np.int64)
        d = days["day"].to_numpy(dtype=np.int64)
        keep = (d < np.repeat(lo[reaches], n)) | (d > np.repeat(hi[reaches], n))
        kept_days = days.loc[keep]
    if kept_days.empty:
        rebuilt = truth
    else:
        rebuilt = months_of_days(pd.concat([kept_days, to_days(truth)], ignore_index=True))
    return joined([stored.loc[~reaches], rebuilt])


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

    stored: the stored periods a run may touch (COLUMNS): every run that overlaps or
    touches the window of its charge type, and every month form of the months the
    windows lie in; lo, hi: each stored period's window. truth: the canonical periods
    the rules give inside the windows. What lies outside a window is kept; runs that
    touch across a window's edge are merged, and a month form holds its days on both
    sides of the window. A stored period the result holds unchanged is neither deleted
    nor inserted.
    """
    stored = stored[COLUMNS].reset_index(drop=True)
    s_month = stored["daily"].notna().to_numpy(dtype=bool)
    t_month = monthly(truth["charge_type"])
    runs = canonical(
        pd.concat([outside(stored.loc[~s_month], lo[~s_month], hi[~s_month]), truth.loc[~t_month, COLUMNS]])
    )
    months = _wanted_months(stored.loc[s_month], truth.loc[t_month, COLUMNS], lo[s_month], hi[s_month])
    wanted = joined([runs, months])
    if stored.empty:
        return Change(delete=empty(), insert=wanted)
    # Rows are unique on each side, so a row equal to its neighbour once all rows are
    # sorted on every column is on both sides. Integer codes keep the sort light.
    both = pd.concat([stored, wanted], ignore_index=True)
    codes = [
        both[c].to_numpy(dtype=np.int64)
        if c in INTS
        else pd.factorize(both[c], use_na_sentinel=True)[0].astype(np.int64)
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
    delete = stored.loc[~matched[:n]].reset_index(drop=True)
    insert = wanted.loc[~matched[n:]].reset_index(drop=True)
    return Change(delete=delete, insert=insert)
