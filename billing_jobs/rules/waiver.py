"""Active Project Waiver: a month's storage fee refunded when compute reaches the threshold."""

from __future__ import annotations

import numpy as np

from billing_jobs.frames import pd


def waiver_refunds(
    storage_totals: pd.DataFrame, compute_totals: pd.DataFrame, threshold_units: int | None
) -> pd.DataFrame:
    """Refund rows for one billing month.

    storage_totals: project_id, amount_units (the month's storage fee charged; other
    columns are ignored).
    compute_totals: project_id, compute_units (sum of valid compute usage, reversals included).
    threshold_units: the inclusive threshold in units, or None when the waiver is off.
    Returns project_id, amount_units (negative), compute_units: one row per project
    whose compute total reaches the threshold and that was charged a storage fee.
    """
    columns = ["project_id", "amount_units", "compute_units"]
    if threshold_units is None or storage_totals.empty:
        return pd.DataFrame({c: pd.Series(dtype=object if c == "project_id" else "int64") for c in columns})
    merged = storage_totals.merge(compute_totals, on="project_id", how="left")
    compute = merged["compute_units"].fillna(0).to_numpy(dtype=np.int64)
    charged = merged["amount_units"].to_numpy(dtype=np.int64)
    refund = (compute >= threshold_units) & (charged > 0)
    return pd.DataFrame(
        {
            "project_id": merged["project_id"].to_numpy(dtype=object)[refund],
            "amount_units": -charged[refund],
            "compute_units": compute[refund],
        }
    )
