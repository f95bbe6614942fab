"""Top-ups: which become lots of credits, which are rejected and why, and which
redemption of a code counts. Pure functions over DataFrames, whole columns at a time;
the ledger job reads the rows (`db.credit_reads`) and writes what these decide.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from billing_jobs.frames import pd
from billing_jobs.rules.calendar import local_day_numbers
from billing_jobs.rules.credits import CHANNELS, CODE, ONLINE, WIRE, TopUpTerms, price_cents, wire_credits
from billing_jobs.settings import Settings

# Reject reasons of top-ups and refund requests (stable codes).
UNKNOWN_ACCOUNT = "unknown_account"
UNKNOWN_CHANNEL = "unknown_channel"
INVALID_CREDITS = "invalid_credits"
INVALID_AMOUNT = "invalid_amount"
BELOW_SMALLEST = "below_smallest_top_up"
UNKNOWN_CODE = "unknown_code"
CODE_EXPIRED = "code_expired"
CODE_ALREADY_REDEEMED = "code_already_redeemed"


def day_of(values: pd.Series, settings: Settings) -> np.ndarray[Any, np.dtype[np.int64]]:
    """The billing day (day number) of each UTC instant."""
    if values.empty:
        return np.array([], dtype=np.int64)
    return local_day_numbers(values, settings.zone)


def period_of_days(days: pd.Series) -> pd.Series:
    """The month `YYYY-MM` of each day number."""
    months = np.asarray(days, dtype=np.int64).astype("datetime64[D]").astype("datetime64[M]")
    return pd.Series(np.datetime_as_string(months, unit="M"), index=days.index, dtype=object)


def decide_codes(redemptions: pd.DataFrame) -> dict[str, str | None]:
    """top_up_id -> None (the code gives its credits) or the reason it does not.

    Redemptions of one code are taken by (paid_at, top_up_id): the first one before the
    code's `redeem_by` redeems it; any later one is `code_already_redeemed`.
    """
    decided: dict[str, str | None] = {}
    if redemptions.empty:
        return decided
    ordered = sorted(redemptions.itertuples(index=False), key=lambda r: (r.paid_at, str(r.top_up_id)))
    redeemed: set[str] = set()
    for r in ordered:
        if not r.known_code:
            decided[r.top_up_id] = UNKNOWN_CODE
        elif r.paid_at >= r.redeem_by:
            decided[r.top_up_id] = CODE_EXPIRED
        elif r.code in redeemed:
            decided[r.top_up_id] = CODE_ALREADY_REDEEMED
        else:
            redeemed.add(r.code)
            decided[r.top_up_id] = None
    return decided


def validate_top_ups(
    top: pd.DataFrame,
    settings: Settings,
    terms: TopUpTerms,
    codes: pd.DataFrame,
    code_decisions: Mapping[str, str | None],
    *,
    known_accounts: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Split top-ups into lots, rejects and price exceptions (whole columns at a time).

    Returns (lots: lot_id, account_id, channel, credit_units, money_cents, paid_at,
    valid_from, valid_until), (rejects in the `rejects` table's shape), (exceptions).
    """
    df = top.copy()
    df["day"] = day_of(df["paid_at"], settings)
    reason = pd.Series(None, index=df.index, dtype=object)
    detail = pd.Series("", index=df.index, dtype=object)

    def reject(mask: pd.Series, why: str, text: pd.Series | str) -> None:
        new = mask & reason.isna()
        reason[new] = why
        detail[new] = text if isinstance(text, str) else text[new]

    if not known_accounts:
        reject(pd.Series(True, index=df.index), UNKNOWN_ACCOUNT, "account_id " + df["account_id"].astype(str))
    channel = df["channel"]
    reject(~channel.isin(CHANNELS), UNKNOWN_CHANNEL, "channel " + channel.astype(str))
    credit_units = df["credit_units"]
    amount = df["amount_cents"]
    online, wire, code = channel == ONLINE, channel == WIRE, channel == CODE
    bad_credits = credit_units.isna() | (pd.to_numeric(credit_units, errors="coerce").fillna(0) <= 0)
    reject(
        online & bad_credits,
        INVALID_CREDITS,
        "credits " + df["credits_problem"].fillna("not positive").astype(str),
    )
    amount_num = pd.to_numeric(amount, errors="coerce")
    reject(
        online & (amount.isna() | (amount_num < 0)),
        INVALID_AMOUNT,
        "amount_paid " + df["amount_problem"].fillna("negative").astype(str),
    )
    reject(
        wire & (amount.isna() | (amount_num.fillna(0) <= 0)),
        INVALID_AMOUNT,
        "amount_paid " + df["amount_problem"].fillna("not positive").astype(str),
    )
    wire_rows = wire & reason.isna()
    bought = pd.Series(-1, index=df.index, dtype=object)
    if wire_rows.any():
        bought[wire_rows] = wire_credits(terms, amount[wire_rows].astype(object), df.loc[wire_rows, "day"])
    smallest = terms.smallest_amount_cents
    reject(
        wire_rows & (bought == -1),
        BELOW_SMALLEST,
        f"amount_paid below the smallest top-up ({smallest // 100}.{smallest % 100:02d})",
    )
    code_reason = df["top_up_id"].map(lambda i: code_decisions.get(i, UNKNOWN_CODE))
    code_rejected = code & code_reason.notna() & reason.isna()
    reason[code_rejected] = code_reason[code_rejected]
    detail[code_rejected] = "code " + df.loc[code_rejected, "code"].astype(str)

    ok = reason.isna()
    period = period_of_days(df["day"])
    rejects = pd.DataFrame(
        {
            "source_table": "top_ups",
            "source_id": df.loc[~ok, "top_up_id"],
            "reason": reason[~ok],
            "project_id": None,
            "period": period[~ok],
            "detail": detail[~ok],
            "account_id": df.loc[~ok, "account_id"],
        }
    )
    good = df[ok].copy()
    lots = pd.DataFrame(
        {
            "lot_id": good["top_up_id"],
            "account_id": good["account_id"],
            "channel": good["channel"],
            "paid_at": good["paid_at"],
            "valid_from": good["day"].astype(np.int64),
        }
    )
    credits = pd.Series(0, index=good.index, dtype=object)
    money = pd.Series(0, index=good.index, dtype=object)
    valid_days = pd.Series(settings.validity_days, index=good.index, dtype=np.int64)
    g_online, g_wire, g_code = good["channel"] == ONLINE, good["channel"] == WIRE, good["channel"] == CODE
    credits[g_online] = good.loc[g_online, "credit_units"]
    money[g_online] = good.loc[g_online, "amount_cents"]
    credits[g_wire] = bought[good.index[g_wire]]
    money[g_wire] = good.loc[g_wire, "amount_cents"]
    if g_code.any():
        terms_of = codes.set_index("top_up_id")
        ids = good.loc[g_code, "top_up_id"]
        credits[g_code] = ids.map(terms_of["code_units"]).to_numpy()
        valid_days[g_code] = ids.map(terms_of["valid_days"]).astype(np.int64).to_numpy()
    lots["credit_units"] = credits.map(int)
    lots["money_cents"] = money.map(int)
    lots["valid_until"] = lots["valid_from"] + valid_days
    # Price exceptions: online top-ups funded as recorded at another price than the tier's.
    exceptions = pd.DataFrame(
        columns=["top_up_id", "account_id", "day", "credit_units", "amount_cents", "tier_cents"]
    )
    if g_online.any():
        on = good[g_online]
        expected = price_cents(terms, on["credit_units"].astype(object), on["day"])
        differs = np.array(
            [int(e) != int(a) for e, a in zip(expected, on["amount_cents"], strict=True)], dtype=bool
        )
        if differs.any():
            exceptions = pd.DataFrame(
                {
                    "top_up_id": on["top_up_id"].to_numpy()[differs],
                    "account_id": on["account_id"].to_numpy()[differs],
                    "day": on["day"].to_numpy()[differs],
                    "credit_units": on["credit_units"].to_numpy()[differs],
                    "amount_cents": on["amount_cents"].to_numpy()[differs],
                    "tier_cents": np.asarray(expected, dtype=object)[differs],
                }
            )
    return lots.reset_index(drop=True), rejects.reset_index(drop=True), exceptions


def refund_rejects(requests: pd.DataFrame, settings: Settings) -> pd.DataFrame:
    """Refund requests of accounts that do not exist, as rejects (`unknown_account`)."""
    days = pd.Series(day_of(requests["requested_at"], settings), index=requests.index)
    return pd.DataFrame(
        {
            "source_table": "refund_requests",
            "source_id": requests["request_id"],
            "reason": UNKNOWN_ACCOUNT,
            "project_id": None,
            "period": period_of_days(days),
            "detail": "account_id " + requests["account_id"].astype(str),
            "account_id": requests["account_id"],
        }
    )
