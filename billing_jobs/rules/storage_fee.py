"""Creation Storage Fee: active days, free months, legacy month, monthly cap.

One function per rule of billing-rules.md (Creation Storage Fee), each over
whole columns:

- `active_days`:        the billing days a project is active (positive overlap).
- `free_window`:        the free first month (new projects) or legacy free month.
- `apply_monthly_cap`:  charges in date order, `min(rate, cap - charged so far)`.
- `storage_days`:       all of the above for one billing month, one row per
                        active day with its status, the input of charges,
                        invoices and `explain` alike.
- `charged_runs`:       the charged days as runs of consecutive days with the same
                        amount: what the charge store holds (`rules.periods`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from zoneinfo import ZoneInfo

import numpy as np

from billing_jobs.frames import pd
from billing_jobs.rules.calendar import (
    Month,
    add_months_days,
    day_number,
    local_day_numbers,
    local_day_numbers_before,
)
from billing_jobs.rules.money import to_units

# Day statuses, as shown by `explain` and counted in previews.
BEFORE_EFFECTIVE = "before_effective_date"
FREE_NEW = "free_first_month"
FREE_LEGACY = "free_legacy_month"
CHARGED = "charged"
CAP_REACHED = "cap_reached"


@dataclass(frozen=True)
class StorageRules:
    """The storage fee settings, in exact units and day numbers."""

    effective_day: int
    rate_units: int
    cap_units: int
    new_project_free_months: int
    new_project_promo_until_day: int | None
    legacy_free_months: int

    @classmethod
    def from_values(
        cls,
        *,
        effective_from: date,
        credits_per_day: object,
        monthly_cap: object,
        new_project_free_months: int,
        new_project_promo_until: date | None,
        legacy_free_months: int,
    ) -> StorageRules:
        return cls(
            effective_day=day_number(effective_from),
            rate_units=to_units(credits_per_day),  # type: ignore[arg-type]
            cap_units=to_units(monthly_cap),  # type: ignore[arg-type]
            new_project_free_months=new_project_free_months,
            new_project_promo_until_day=(
                day_number(new_project_promo_until) if new_project_promo_until else None
            ),
            legacy_free_months=legacy_free_months,
        )


def active_day_codes(
    codes: np.ndarray,
    starts: pd.Series,
    ends: pd.Series,
    first_day: int,
    last_day: int,
    zone: ZoneInfo,
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (code, day) pairs, sorted, where an interval overlaps the day.

    codes: an integer per interval (its project's position); starts/ends: naive
    UTC, half-open. A day counts when the overlap has positive length; days
    outside `first_day..last_day` (day numbers, inclusive) are left out.
    """
    codes = np.asarray(codes, dtype=np.int64)
    if len(codes) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    lo = np.maximum(local_day_numbers(starts, zone), first_day)
    hi = np.minimum(local_day_numbers_before(ends, zone), last_day)
    keep = (hi >= lo) & (starts.to_numpy() < ends.to_numpy())
    lo, hi, codes = lo[keep], hi[keep], codes[keep]
    lengths = (hi - lo + 1).astype(np.int64)
    rows = np.repeat(np.arange(len(lo)), lengths)
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    span = last_day - first_day + 1
    key = np.sort(codes[rows] * span + (lo[rows] + offsets - first_day))
    if len(key):
        # Sorted de-duplication (numpy's hash-based unique is far slower on large arrays).
        key = key[np.concatenate(([True], key[1:] != key[:-1]))]
    return key // span, key % span + first_day


def active_days(intervals: pd.DataFrame, first_day: int, last_day: int, zone: ZoneInfo) -> pd.DataFrame:
    """Distinct (project_id, day) pairs where an interval overlaps the day.

    intervals: project_id, start, end (naive UTC, half-open).
    """
    codes, ids = pd.factorize(intervals["project_id"].to_numpy(dtype=object))
    code, day = active_day_codes(codes, intervals["start"], intervals["end"], first_day, last_day, zone)
    ids = np.asarray(ids, dtype=object)
    return pd.DataFrame({"project_id": ids[code] if len(code) else np.array([], dtype=object), "day": day})


def free_window(created_day: np.ndarray, rules: StorageRules) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per project: the free window [lo, hi) in day numbers, and which promotion.

    New project (created on or after the effective date, before the promotion
    end if set): its first N calendar months. Legacy project (created before the
    effective date): the first N calendar months from the effective date.
    Returns (lo, hi, kind) with kind '' where no window applies (lo == hi).
    """
    created_day = np.asarray(created_day, dtype=np.int64)
    e = rules.effective_day
    n = len(created_day)
    lo = np.zeros(n, dtype=np.int64)
    hi = np.zeros(n, dtype=np.int64)
    kind = np.full(n, "", dtype=object)

    new = created_day >= e
    if rules.new_project_promo_until_day is not None:
        new &= created_day < rules.new_project_promo_until_day
    if rules.new_project_free_months > 0 and new.any():
        lo[new] = created_day[new]
        hi[new] = add_months_days(created_day[new], rules.new_project_free_months)
        kind[new] = FREE_NEW

    legacy = created_day < e
    if rules.legacy_free_months > 0 and legacy.any():
        lo[legacy] = e
        hi[legacy] = add_months_days(np.array([e]), rules.legacy_free_months)[0]
        kind[legacy] = FREE_LEGACY
    return lo, hi, kind


def apply_monthly_cap(
    project_codes: np.ndarray, billable: np.ndarray, rate_units: int, cap_units: int
) -> np.ndarray:
    """Charge units per row: rows sorted by (project, day) within one month.

    The k-th billable day of a project is charged min(rate, cap - charged before);
    a day whose charge would be 0 is charged 0 (and is not a charge).
    """
    codes = np.asarray(project_codes)
    b = np.asarray(billable, dtype=bool).astype(np.int64)
    if len(codes) == 0:
        return np.zeros(0, dtype=np.int64)
    k = pd.Series(b).groupby(codes).cumsum().to_numpy(dtype=np.int64)
    cum_after = np.minimum(k * rate_units, cap_units)
    cum_before = np.minimum((k - b) * rate_units, cap_units)
    charges: np.ndarray = (cum_after - cum_before).astype(np.int64)
    return charges


def storage_days(
    projects: pd.DataFrame,
    active_intervals: pd.DataFrame,
    month: Month,
    zone: ZoneInfo,
    rules: StorageRules,
) -> pd.DataFrame:
    """Every active day of `month` for every project, with its status and charge.

    projects: project_id, created_at (naive UTC). active_intervals: project_id,
    start, end. Returns project_id, day (day number), status, amount_units,
    sorted by project and day. Only rows with status `charged` carry money.
    """
    first, last = day_number(month.first_day), day_number(month.last_day)
    pids = pd.Index(projects["project_id"].to_numpy(dtype=object))
    interval_codes = pids.get_indexer(active_intervals["project_id"])
    known = interval_codes >= 0
    code, day = active_day_codes(
        interval_codes[known],
        active_intervals["start"][known],
        active_intervals["end"][known],
        first,
        last,
        zone,
    )
    created_day = local_day_numbers(projects["created_at"], zone)
    lo, hi, kind = free_window(created_day, rules)

    before = day < rules.effective_day
    free = (day >= lo[code]) & (day < hi[code]) & ~before
    billable = ~before & ~free
    amount = apply_monthly_cap(code, billable, rules.rate_units, rules.cap_units)

    kind_code = np.where(kind == FREE_NEW, 2, 3)
    status_code = np.select([before, free, billable & (amount > 0)], [0, kind_code[code], 4], default=1)
    status = pd.Categorical.from_codes(
        status_code, categories=[BEFORE_EFFECTIVE, CAP_REACHED, FREE_NEW, FREE_LEGACY, CHARGED]
    )
    return pd.DataFrame(
        {
            "project_id": pids.to_numpy(dtype=object)[code],
            "day": day,
            "status": status,
            "amount_units": amount,
        }
    )


def storage_charges(days: pd.DataFrame) -> pd.DataFrame:
    """The charged rows of `storage_days`: project_id, day, amount_units."""
    charged = days.loc[days["amount_units"] > 0, ["project_id", "day", "amount_units"]]
    return charged.reset_index(drop=True)


def charged_runs(charged: pd.DataFrame) -> pd.DataFrame:
    """The charged days of one month (`storage_charges`: project_id, day, amount_units,
    each project's rows together and in day order, as `storage_days` gives them) as
    runs of consecutive days with the same amount: project_id, first_day, last_day,
    amount_units. No sort: a run starts where the project, the amount or the next day
    changes."""
    project = charged["project_id"].to_numpy(dtype=object)
    day = charged["day"].to_numpy(dtype=np.int64)
    amount = charged["amount_units"].to_numpy(dtype=np.int64)
    if not len(day):
        return pd.DataFrame(
            {
                "project_id": pd.Series(dtype=object),
                "first_day": pd.Series(dtype=np.int64),
                "last_day": pd.Series(dtype=np.int64),
                "amount_units": pd.Series(dtype=np.int64),
            }
        )
    start = np.ones(len(day), dtype=bool)
    start[1:] = (project[1:] != project[:-1]) | (day[1:] != day[:-1] + 1) | (amount[1:] != amount[:-1])
    first = np.flatnonzero(start)
    last = np.append(first[1:], len(day)) - 1
    return pd.DataFrame(
        {
            "project_id": project[first],
            "first_day": day[first],
            "last_day": day[last],
            "amount_units": amount[first],
        }
    )
