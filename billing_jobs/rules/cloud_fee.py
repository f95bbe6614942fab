"""Cloud Service Fee: published projects pay per (project, day, metric)."""

from __future__ import annotations

from decimal import Decimal
from zoneinfo import ZoneInfo

import numpy as np

from billing_jobs.frames import pd
from billing_jobs.rules.money import round_half_up_units
from billing_jobs.rules.storage_fee import active_days

LINE_TYPES = {
    "page_views": "cloud_page_views",
    "bandwidth_gb": "cloud_bandwidth",
    "data_storage_gb": "cloud_data_storage",
    "domains": "cloud_domains",
}

NOT_PUBLISHED = "not_published_that_day"
BEFORE_EFFECTIVE = "before_effective_date"


def published_days(
    published_intervals: pd.DataFrame, first_day: int, last_day: int, zone: ZoneInfo
) -> pd.DataFrame:
    """Distinct (project_id, day) a project is published on, within the days given."""
    return active_days(published_intervals, first_day, last_day, zone)


def cloud_fees(
    usage: pd.DataFrame,
    published: pd.DataFrame,
    effective_day: int,
    prices: dict[str, Decimal],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Daily cloud fee amounts, and the usage groups that cannot be billed.

    usage: project_id, day (day number), metric, quantity_units (the day's sum of
    valid rows for that metric, in 1/10,000 units). published: project_id, day.
    Returns (fees, rejected): fees has project_id, day, metric, line_type,
    quantity_units, amount_units = round_half_up(quantity * price, 4);
    rejected has project_id, day, metric, reason.
    """
    marked = usage.reset_index(drop=True)
    is_published = _published(marked, published)
    early = marked["day"].to_numpy(dtype=np.int64) < effective_day
    ok = is_published & ~early
    rejected = marked.loc[~ok, ["project_id", "day", "metric"]].assign(
        reason=np.where(early[~ok], BEFORE_EFFECTIVE, NOT_PUBLISHED).astype(object)
    )
    fees = marked.loc[ok, ["project_id", "day", "metric", "quantity_units"]].reset_index(drop=True)
    # Each metric once (its codes), not a comparison or a lookup per row.
    codes, names = pd.factorize(fees["metric"].to_numpy(dtype=object))
    quantity = fees["quantity_units"].to_numpy(dtype=np.int64)
    amounts = np.zeros(len(fees), dtype=np.int64)
    for code, name in enumerate(names):
        if name in prices:
            rows = codes == code
            amounts[rows] = round_half_up_units(quantity[rows], prices[name])
    line_types = np.array([LINE_TYPES.get(name) for name in names], dtype=object)
    fees["line_type"] = line_types[codes]
    fees["amount_units"] = amounts
    return fees, rejected.reset_index(drop=True)


def _published(usage: pd.DataFrame, published: pd.DataFrame) -> np.ndarray:
    """Whether each usage row's (project_id, day) is among the published days: both
    sides' projects numbered together, each pair one integer, looked up sorted (no
    merge of object columns)."""
    if usage.empty or published.empty:
        return np.zeros(len(usage), dtype=bool)
    ids = np.concatenate(
        [usage["project_id"].to_numpy(dtype=object), published["project_id"].to_numpy(dtype=object)]
    )
    codes, _ = pd.factorize(ids)
    days = np.concatenate([usage["day"].to_numpy(dtype=np.int64), published["day"].to_numpy(dtype=np.int64)])
    low = int(days.min())
    span = int(days.max()) - low + 1
    keys = codes.astype(np.int64) * span + (days - low)
    found: np.ndarray = np.isin(keys[: len(usage)], keys[len(usage) :])
    return found
