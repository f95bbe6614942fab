"""Invoice lines: the month's lines per project, and adjustments as differences."""

from __future__ import annotations

from decimal import Decimal

import numpy as np

from billing_jobs.frames import pd
from billing_jobs.rules.calendar import Month
from billing_jobs.rules.cloud_fee import LINE_TYPES
from billing_jobs.rules.groups import sums_together
from billing_jobs.rules.money import UNITS_PER_CREDIT, format_decimal

STORAGE_FEE = "storage_fee"
STORAGE_REFUND = "storage_refund"
LINE_ORDER = [STORAGE_FEE, STORAGE_REFUND, *LINE_TYPES.values()]
KEY = ["account_id", "project_id", "line_type"]
LINE_COLUMNS = [*KEY, "quantity_units", "unit_price", "amount_units"]
REGULAR, ADJUSTMENT = "regular", "adjustment"  # the kinds of a month's invoices
HEAD_COLUMNS = ["invoice_id", "account_id", "kind", "sequence", "total_units", "line_count"]


def empty_lines() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "account_id": pd.Series(dtype=object),
            "project_id": pd.Series(dtype=object),
            "line_type": pd.Series(dtype=object),
            "quantity_units": pd.Series(dtype="int64"),
            "unit_price": pd.Series(dtype=object),
            "amount_units": pd.Series(dtype="int64"),
        }
    )


def unit_prices(credits_per_day: Decimal, cloud_prices: dict[str, Decimal]) -> dict[str, str]:
    prices = {STORAGE_FEE: format_decimal(credits_per_day), STORAGE_REFUND: ""}
    for metric, line_type in LINE_TYPES.items():
        prices[line_type] = format_decimal(cloud_prices[metric])
    return prices


def storage_totals(storage_charges: pd.DataFrame) -> pd.DataFrame:
    """The storage fee charged per project: project_id, rows (days charged),
    amount_units. storage_charges: project_id, day, amount_units (charged days only)."""
    return _summed(storage_charges, ["project_id"], "amount_units")


def month_lines(
    storage_charges: pd.DataFrame,
    refunds: pd.DataFrame,
    cloud: pd.DataFrame,
    accounts: pd.Series,
    prices: dict[str, str],
    *,
    totals: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One line per (account, project, line type) for a billing month.

    storage_charges: project_id, day, amount_units (charged days only).
    refunds: project_id, amount_units (negative).
    cloud: project_id, line_type, quantity_units, amount_units (daily amounts).
    accounts: account_id indexed by project_id.
    totals: `storage_totals(storage_charges)`, when the caller has it already.
    """
    parts = []
    if len(storage_charges):
        s = storage_totals(storage_charges) if totals is None else totals
        parts.append(
            pd.DataFrame(
                {
                    "project_id": s["project_id"].to_numpy(dtype=object),
                    "line_type": STORAGE_FEE,
                    "quantity_units": s["rows"].to_numpy(dtype=np.int64) * UNITS_PER_CREDIT,
                    "amount_units": s["amount_units"].to_numpy(dtype=np.int64),
                }
            )
        )
    if len(refunds):
        parts.append(
            pd.DataFrame(
                {
                    "project_id": refunds["project_id"].to_numpy(dtype=object),
                    "line_type": STORAGE_REFUND,
                    "quantity_units": np.full(len(refunds), UNITS_PER_CREDIT, dtype=np.int64),
                    "amount_units": refunds["amount_units"].to_numpy(dtype=np.int64),
                }
            )
        )
    if len(cloud):
        parts.append(_summed(cloud, ["project_id", "line_type"], "quantity_units", "amount_units"))
    if not parts:
        return empty_lines()
    lines = pd.concat(parts, ignore_index=True)
    lines["account_id"] = accounts.reindex(lines["project_id"]).to_numpy(dtype=object)
    lines["unit_price"] = lines["line_type"].map(prices).astype(object)
    lines["quantity_units"] = lines["quantity_units"].astype(np.int64)
    lines["amount_units"] = lines["amount_units"].astype(np.int64)
    return sort_lines(lines[LINE_COLUMNS])


def _summed(frame: pd.DataFrame, keys: list[str], *columns: str) -> pd.DataFrame:
    """The frame's rows per key (in the order the keys first come): the keys, `rows`,
    and each column summed. Rows that come grouped and in day order, as the chunk's
    charges do, are summed without a sort (`rules.groups`)."""
    summed = sums_together(
        tuple(frame[k].to_numpy(dtype=object) for k in keys),
        frame["day"].to_numpy(dtype=np.int64),
        tuple(frame[c].to_numpy(dtype=np.int64) for c in columns),
    )
    if summed is None:
        grouped = frame.groupby(keys, sort=False, as_index=False)
        out = grouped[list(columns)].sum()
        return out.assign(rows=grouped.size()["size"].to_numpy(dtype=np.int64))
    first, rows, sums = summed
    return pd.DataFrame(
        {
            **{k: frame[k].to_numpy(dtype=object)[first] for k in keys},
            "rows": rows,
            **dict(zip(columns, sums, strict=True)),
        }
    )


def sort_lines(lines: pd.DataFrame) -> pd.DataFrame:
    rank = lines["line_type"].map({t: i for i, t in enumerate(LINE_ORDER)})
    return (
        lines.assign(_rank=rank)
        .sort_values(["account_id", "project_id", "_rank"], kind="stable")
        .drop(columns="_rank")
        .reset_index(drop=True)
    )


def adjustment_lines(truth: pd.DataFrame, invoiced: pd.DataFrame) -> pd.DataFrame:
    """Lines that bring the sum of a month's invoices to the truth: truth - invoiced.

    invoiced: account_id, project_id, line_type, quantity_units, amount_units summed
    over every invoice already written for the month. Rows with no difference are
    left out, so an unchanged month gives no lines at all.
    """
    if _aligned(truth, invoiced):  # the same keys row for row: no join
        quantity = truth["quantity_units"].to_numpy(dtype=np.int64) - invoiced["quantity_units"].to_numpy(
            dtype=np.int64
        )
        amount = truth["amount_units"].to_numpy(dtype=np.int64) - invoiced["amount_units"].to_numpy(
            dtype=np.int64
        )
        changed = (quantity != 0) | (amount != 0)
        if not changed.any():
            return empty_lines()
        out = truth.loc[changed, LINE_COLUMNS].assign(
            quantity_units=quantity[changed],
            amount_units=amount[changed],
        )
        out["unit_price"] = out["unit_price"].astype(object)
        return sort_lines(out)
    t = truth[[*KEY, "quantity_units", "amount_units", "unit_price"]]
    i = invoiced[[*KEY, "quantity_units", "amount_units"]]
    merged = t.merge(i, on=KEY, how="outer", suffixes=("", "_inv"))
    for col in ("quantity_units", "amount_units", "quantity_units_inv", "amount_units_inv"):
        merged[col] = merged[col].fillna(0).astype(np.int64)
    diff = merged.assign(
        quantity_units=merged["quantity_units"] - merged["quantity_units_inv"],
        amount_units=merged["amount_units"] - merged["amount_units_inv"],
    )
    changed = (diff["quantity_units"] != 0) | (diff["amount_units"] != 0)
    out = diff.loc[changed, LINE_COLUMNS].copy()
    out["unit_price"] = out["unit_price"].fillna("").astype(object)
    return sort_lines(out) if len(out) else empty_lines()


def _aligned(truth: pd.DataFrame, invoiced: pd.DataFrame) -> bool:
    """Whether the two hold the same keys in the same order (the finalized lines read
    back as the first close wrote them, which is most often the case)."""
    return len(truth) == len(invoiced) and all(
        bool((truth[k].to_numpy(dtype=object) == invoiced[k].to_numpy(dtype=object)).all()) for k in KEY
    )


def invoice_id(kind: str, month: Month, account_id: str, sequence: int) -> str:
    if kind == REGULAR:
        return f"INV-{month}-{account_id}"
    return f"ADJ-{month}-{account_id}-{sequence:03d}"


def drafts_for(
    lines: pd.DataFrame, month: Month, kind: str, sequences: dict[str, int]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The drafts holding `lines`: one invoice per account (its total and line count),
    and the lines with their invoice's id."""
    if lines.empty:
        return pd.DataFrame(columns=HEAD_COLUMNS), lines.assign(invoice_id=pd.Series(dtype=object))
    heads = lines.groupby("account_id", as_index=False, sort=True).agg(
        total_units=("amount_units", "sum"), line_count=("amount_units", "size")
    )
    if kind == REGULAR:
        heads["sequence"] = 0
    else:
        heads["sequence"] = [max(sequences.get(a, 1), 1) for a in heads["account_id"]]
    heads["kind"] = kind
    heads["invoice_id"] = [
        invoice_id(kind, month, a, s) for a, s in zip(heads["account_id"], heads["sequence"], strict=True)
    ]
    lines = lines.merge(heads[["account_id", "invoice_id"]], on="account_id")
    return heads, lines
