"""Reconciling a closed month: where two sets of sums per invoice line disagree.

A closed month is checked twice (`jobs.reconcile`):

- **recomputed**: the month's finalized invoices (regular and adjustments, summed)
  against the lines the rules give on the source data as it is now, the lines a
  re-close would compare them with;
- **stored**: the same invoices against the stored daily charges of the month's
  days. Only the line types that are sums of daily charges take part
  (`storage_fee` and the cloud lines): a `storage_refund` line is the waiver,
  computed at month close from compute usage, and has no daily charge.

Both are `differences(invoiced, other)`: frames of sums per (account, project,
line type). A difference is found per project and reported per (account, line
type), with both sides' sums over the whole (account, line type). Pure: frames
in, a frame out.
"""

from __future__ import annotations

import numpy as np

from billing_jobs.frames import pd
from billing_jobs.rules.cloud_fee import LINE_TYPES
from billing_jobs.rules.invoice import KEY, LINE_ORDER, STORAGE_FEE

RECOMPUTED = "recomputed"
STORED = "stored"
CHECKS = (RECOMPUTED, STORED)
CHARGE_LINE_TYPES = (STORAGE_FEE, *LINE_TYPES.values())
REPORT_KEY = ["account_id", "line_type"]
SUMS = ["quantity_units", "amount_units"]
COLUMNS = [
    *REPORT_KEY,
    "invoiced_quantity",
    "invoiced_units",
    "other_quantity",
    "other_units",
    "difference_units",
]


def _empty(columns: list[str], keys: list[str]) -> pd.DataFrame:
    """No rows: the key columns as objects, the others as integers."""
    return pd.DataFrame({c: pd.Series(dtype=object if c in keys else "int64") for c in columns})


def empty_differences() -> pd.DataFrame:
    return _empty(COLUMNS, REPORT_KEY)


def _sums(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty:
        return _empty([*KEY, *SUMS], KEY)
    return frame.groupby(KEY, as_index=False, sort=False)[SUMS].sum()


def charge_lines(lines: pd.DataFrame) -> pd.DataFrame:
    """The lines that are sums of daily charges (not the waiver's refunds)."""
    return lines.loc[lines["line_type"].isin(CHARGE_LINE_TYPES)]


def differences(invoiced: pd.DataFrame, other: pd.DataFrame) -> pd.DataFrame:
    """Per (account, line type) where some project's quantity or amount differs.

    invoiced, other: account_id, project_id, line_type, quantity_units, amount_units
    (several rows of one key are summed). Returns `COLUMNS`: each side's sums over
    the (account, line type) and `difference_units` = other - invoiced, sorted by
    account (code-point order) and the invoice's line order; empty when they agree.
    """
    merged = _sums(invoiced).merge(_sums(other), on=KEY, how="outer", suffixes=("_inv", "_oth"))
    if merged.empty:
        return empty_differences()
    for col in ("quantity_units_inv", "amount_units_inv", "quantity_units_oth", "amount_units_oth"):
        merged[col] = merged[col].fillna(0).astype(np.int64)
    changed = (merged["quantity_units_inv"] != merged["quantity_units_oth"]) | (
        merged["amount_units_inv"] != merged["amount_units_oth"]
    )
    if not changed.any():
        return empty_differences()
    pairs = merged.loc[changed, REPORT_KEY].drop_duplicates()
    totals = merged.groupby(REPORT_KEY, as_index=False, sort=False)[
        ["quantity_units_inv", "amount_units_inv", "quantity_units_oth", "amount_units_oth"]
    ].sum()
    out = pairs.merge(totals, on=REPORT_KEY).rename(
        columns={
            "quantity_units_inv": "invoiced_quantity",
            "amount_units_inv": "invoiced_units",
            "quantity_units_oth": "other_quantity",
            "amount_units_oth": "other_units",
        }
    )
    out["difference_units"] = out["other_units"] - out["invoiced_units"]
    return sort_differences(out[COLUMNS])


def sort_differences(frame: pd.DataFrame) -> pd.DataFrame:
    rank = frame["line_type"].map({t: i for i, t in enumerate(LINE_ORDER)}).fillna(len(LINE_ORDER))
    return (
        frame.assign(_rank=rank)
        .sort_values(["account_id", "_rank", "line_type"], kind="stable")
        .drop(columns="_rank")
        .reset_index(drop=True)
    )


LEDGER_KEY = ["account_id", "lot_id", "kind"]
LEDGER_COLUMNS = [
    *LEDGER_KEY,
    "written_units",
    "recomputed_units",
    "written_money",
    "recomputed_money",
    "difference_units",
]


def empty_ledger_differences() -> pd.DataFrame:
    return _empty(LEDGER_COLUMNS, LEDGER_KEY)


def _entry_sums(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty:
        return _empty([*LEDGER_KEY, "units", "money"], LEDGER_KEY)
    sums = frame.assign(
        units=frame["credit_units"].astype(np.int64),
        money=frame["money_cents"].fillna(0).astype(np.int64),
    )
    return sums.groupby(LEDGER_KEY, as_index=False, sort=False)[["units", "money"]].sum()


def ledger_differences(written: pd.DataFrame, recomputed: pd.DataFrame) -> pd.DataFrame:
    """Per (account, lot, kind) where the written entries' sums differ from the recomputed.

    written, recomputed: account_id, lot_id, kind, credit_units, money_cents (any other
    columns, such as the day, are summed over). Returns `LEDGER_COLUMNS`, with
    `difference_units` = recomputed - written credits, sorted by account, lot and kind
    (code-point order); empty when they agree.
    """
    merged = _entry_sums(written).merge(
        _entry_sums(recomputed), on=LEDGER_KEY, how="outer", suffixes=("_w", "_r")
    )
    for col in ("units_w", "money_w", "units_r", "money_r"):
        merged[col] = merged[col].fillna(0).astype(np.int64)
    differ = (merged["units_w"] != merged["units_r"]) | (merged["money_w"] != merged["money_r"])
    if not differ.any():
        return empty_ledger_differences()
    out = merged.loc[differ].rename(
        columns={
            "units_w": "written_units",
            "units_r": "recomputed_units",
            "money_w": "written_money",
            "money_r": "recomputed_money",
        }
    )
    out["difference_units"] = out["recomputed_units"] - out["written_units"]
    order = sorted(range(len(out)), key=lambda i: tuple(str(out[c].iat[i]) for c in LEDGER_KEY))
    return out.iloc[order][LEDGER_COLUMNS].reset_index(drop=True)
