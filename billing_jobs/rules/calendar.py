"""Billing calendar: billing days and months in the billing timezone.

Timestamps are naive UTC everywhere inside the jobs. A billing day is a local
calendar date; here it is carried as an integer day number (days since
1970-01-01) so that whole columns compare and subtract as integers. The billing
timezone is used only where a UTC instant becomes a billing day or back.
"""

from __future__ import annotations

import calendar as _cal
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

if TYPE_CHECKING:  # numpy and pandas only where whole columns are computed (start-up time)
    import numpy as np
    import numpy.typing as npt
    import pandas as pd

    IntArray = npt.NDArray[np.int64]

EPOCH = date(1970, 1, 1)


def day_number(d: date) -> int:
    return (d - EPOCH).days


def day_from_number(n: int) -> date:
    return EPOCH + timedelta(days=int(n))


@dataclass(frozen=True, order=True)
class Month:
    """A billing month, `YYYY-MM`."""

    year: int
    month: int

    @classmethod
    def parse(cls, text: str) -> Month:
        try:
            year, month = (int(part) for part in text.split("-"))
            if len(text) != 7 or not 1 <= month <= 12 or year < 1:
                raise ValueError
        except ValueError:
            raise ValueError(f"expected a month YYYY-MM, got {text!r}") from None
        return cls(year, month)

    @classmethod
    def of(cls, d: date) -> Month:
        return cls(d.year, d.month)

    @property
    def first_day(self) -> date:
        return date(self.year, self.month, 1)

    @property
    def last_day(self) -> date:
        return date(self.year, self.month, _cal.monthrange(self.year, self.month)[1])

    @property
    def days(self) -> int:
        return _cal.monthrange(self.year, self.month)[1]

    def next(self) -> Month:
        return Month(self.year + self.month // 12, self.month % 12 + 1)

    def previous(self) -> Month:
        return Month(self.year - (self.month == 1), (self.month - 2) % 12 + 1)

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"


def add_months(d: date, months: int) -> date:
    """Calendar arithmetic clamped to the month's end: 2026-01-31 + 1 = 2026-02-28."""
    index = d.year * 12 + d.month - 1 + months
    year, month = divmod(index, 12)
    last = _cal.monthrange(year, month + 1)[1]
    return date(year, month + 1, min(d.day, last))


def add_months_days(days: IntArray, months: int) -> IntArray:
    """`add_months` over a whole column of day numbers."""
    import numpy as np

    dt = np.asarray(days, dtype="int64").astype("datetime64[D]")
    month_start = dt.astype("datetime64[M]")
    day_of_month = (dt - month_start.astype("datetime64[D]")).astype(np.int64)
    target = month_start + np.timedelta64(months, "M")
    target_len = (
        (target + np.timedelta64(1, "M")).astype("datetime64[D]") - target.astype("datetime64[D]")
    ).astype(np.int64)
    clamped = np.minimum(day_of_month, target_len - 1)
    out = target.astype("datetime64[D]") + clamped
    result: IntArray = out.astype(np.int64)
    return result


def local_midnight_utc(d: date, zone: ZoneInfo) -> datetime:
    """The naive UTC instant at which billing day `d` starts."""
    local = datetime.combine(d, time(0), tzinfo=zone)
    return local.astimezone(UTC).replace(tzinfo=None)


def day_bounds_utc(first: date, last: date, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """Half-open naive UTC bounds covering billing days `first`..`last` inclusive."""
    return local_midnight_utc(first, zone), local_midnight_utc(last + timedelta(days=1), zone)


def local_day_numbers(utc: pd.Series | pd.DatetimeIndex, zone: ZoneInfo) -> IntArray:
    """Billing day number of each naive UTC instant (vectorized)."""
    import numpy as np

    from billing_jobs.frames import pd

    index = pd.DatetimeIndex(utc)
    local = index.tz_localize("UTC").tz_convert(zone).tz_localize(None)
    return np.asarray(local.values.astype("datetime64[D]").astype(np.int64), dtype=np.int64)


def local_day_numbers_before(utc: pd.Series | pd.DatetimeIndex, zone: ZoneInfo) -> IntArray:
    """Billing day of the last instant before each naive UTC instant.

    For the end of a half-open interval: an interval ending exactly at local
    midnight does not touch the day that midnight starts.
    """
    from billing_jobs.frames import pd

    index = pd.DatetimeIndex(utc) - pd.Timedelta(microseconds=1)
    return local_day_numbers(index, zone)
