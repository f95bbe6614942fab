"""A month of values per day as one row: the form `credit_inputs` stores compute in.

One row per (key, month): `day` is the month's first day (a day number), `units` the
month's total, and `daily` every day that has a value, as `offset units` pairs
(offset from the month's first day, integer units) in day order, separated by single
spaces. A set of (key, day, units) has exactly one such form, and the form gives the
days back exactly: comparing the rows compares every day.

Pure functions over DataFrames, vectorized over whole columns.
"""

from __future__ import annotations

import numpy as np

from billing_jobs.frames import pd
from billing_jobs.rules.int_texts import group_texts, integers

INTS = ("day", "units")


def month_start(days: np.ndarray) -> np.ndarray:
    """The first day of each day's month (day numbers)."""
    months = np.asarray(days, dtype=np.int64).astype("datetime64[D]").astype("datetime64[M]")
    out: np.ndarray = months.astype("datetime64[D]").astype(np.int64)
    return out


def to_months(frame: pd.DataFrame, key: str = "account_id") -> pd.DataFrame:
    """(key, day, units) rows, one per key and day, as the month form: key, day (the
    month's first day), units (the month's total), daily."""
    columns = [key, "day", "units", "daily"]
    if frame.empty:
        return pd.DataFrame({c: pd.Series(dtype=np.int64 if c in INTS else object) for c in columns})
    keys = frame[key].to_numpy(dtype=object)
    day = frame["day"].to_numpy(dtype=np.int64)
    units = frame["units"].to_numpy(dtype=np.int64)
    codes, uniques = pd.factorize(keys, sort=True)
    start = month_start(day)
    order = np.lexsort((day, start, codes))
    codes, day, units, start = codes[order], day[order], units[order], start[order]
    if (np.diff(day)[(codes[1:] == codes[:-1])] == 0).any():
        raise ValueError("day values: a key has two values for one day")
    group = np.flatnonzero(np.r_[True, (codes[1:] != codes[:-1]) | (start[1:] != start[:-1])])
    daily = group_texts(np.column_stack((day - start, units)), group)
    return pd.DataFrame(
        {
            key: np.asarray(uniques, dtype=object)[codes[group]],
            "day": start[group],
            "units": np.add.reduceat(units, group) if len(group) else units[:0],
            "daily": daily,
        }
    )


def to_days(frame: pd.DataFrame, key: str = "account_id") -> pd.DataFrame:
    """The month form's rows (key, day, daily) back as (key, day, units), by key and day."""
    texts = frame["daily"].to_numpy(dtype=object)
    if not len(texts):
        return pd.DataFrame(
            {
                key: pd.Series(dtype=object),
                "day": pd.Series(dtype=np.int64),
                "units": pd.Series(dtype=np.int64),
            }
        )
    words = np.array([t.count(" ") + 1 if t else 0 for t in texts], dtype=np.int64)
    try:
        values = integers(" ".join(t for t in texts if t))
    except ValueError:
        values = np.empty(0, dtype=np.int64)
    if (words % 2).any() or len(values) != words.sum():
        raise ValueError("day values: a daily text is not a list of `offset units` pairs")
    counts, values = words // 2, values.reshape(-1, 2)
    row = np.repeat(np.arange(len(texts)), counts)
    return pd.DataFrame(
        {
            key: frame[key].to_numpy(dtype=object)[row],
            "day": frame["day"].to_numpy(dtype=np.int64)[row] + values[:, 0],
            "units": values[:, 1],
        }
    )
