"""`rules.top_ups` on plain frames: which redemption of a code counts, and which
top-ups become lots (with their credits, money and validity) or are rejected and why.
The same rules run through the commands in `tests/integration/test_credits_examples.py`."""

from __future__ import annotations

from datetime import date, datetime

import pandas as pd

from billing_jobs.rules.calendar import day_number
from billing_jobs.rules.top_ups import (
    CODE_ALREADY_REDEEMED,
    CODE_EXPIRED,
    INVALID_AMOUNT,
    INVALID_CREDITS,
    UNKNOWN_CHANNEL,
    UNKNOWN_CODE,
    decide_codes,
    validate_top_ups,
)
from billing_jobs.settings import load_settings

SETTINGS = load_settings()
TERMS = SETTINGS.top_up_terms()
U = 10_000  # units per credit


def _redemptions(rows: list[tuple[str, str, str, bool, str]]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "top_up_id": top_up,
                "code": code,
                "paid_at": datetime.fromisoformat(paid),
                "known_code": known,
                "code_units": 50 * U,
                "redeem_by": datetime.fromisoformat(redeem_by),
                "valid_days": 30,
            }
            for top_up, code, paid, known, redeem_by in rows
        ]
    )


def test_the_first_redemption_before_redeem_by_counts_and_the_others_say_why_not() -> None:
    codes = _redemptions(
        [
            ("t3", "AAAA", "2026-05-03 09:00", True, "2026-06-01"),
            ("t1", "AAAA", "2026-05-02 09:00", True, "2026-06-01"),
            ("t0", "AAAA", "2026-05-02 09:00", True, "2026-06-01"),  # same instant: the id decides
            ("t4", "BBBB", "2026-06-01 00:00", True, "2026-06-01"),  # at redeem_by: too late
            ("t5", "CCCC", "2026-05-02 09:00", False, "2026-06-01"),
        ]
    )
    assert decide_codes(codes) == {
        "t0": None,
        "t1": CODE_ALREADY_REDEEMED,
        "t3": CODE_ALREADY_REDEEMED,
        "t4": CODE_EXPIRED,
        "t5": UNKNOWN_CODE,
    }
    # Whatever order the rows come in.
    assert decide_codes(codes.iloc[::-1].reset_index(drop=True)) == decide_codes(codes)


def _top_ups(rows: list[dict[str, object]]) -> pd.DataFrame:
    base = {"code": None, "credits_problem": None, "amount_problem": None}
    frame = pd.DataFrame([{**base, **r} for r in rows])
    frame["paid_at"] = pd.to_datetime(frame["paid_at"])
    return frame.astype({"credit_units": object, "amount_cents": object})


def test_top_ups_become_lots_or_rejects_with_their_reason() -> None:
    top = _top_ups(
        [
            {"top_up_id": "on", "account_id": "a", "channel": "online", "paid_at": "2026-05-02 10:00",
             "credit_units": 100 * U, "amount_cents": 1000},
            {"top_up_id": "neg", "account_id": "a", "channel": "online", "paid_at": "2026-05-02 10:00",
             "credit_units": 100 * U, "amount_cents": -5},
            {"top_up_id": "zero", "account_id": "a", "channel": "online", "paid_at": "2026-05-02 10:00",
             "credit_units": 0, "amount_cents": 1000},
            {"top_up_id": "fax", "account_id": "a", "channel": "fax", "paid_at": "2026-05-02 10:00",
             "credit_units": 100 * U, "amount_cents": 1000},
            {"top_up_id": "c1", "account_id": "a", "channel": "code", "paid_at": "2026-05-02 10:00",
             "credit_units": None, "amount_cents": None, "code": "AAAA"},
            {"top_up_id": "c2", "account_id": "a", "channel": "code", "paid_at": "2026-05-03 10:00",
             "credit_units": None, "amount_cents": None, "code": "AAAA"},
        ]
    )  # fmt: skip
    codes = _redemptions(
        [
            ("c1", "AAAA", "2026-05-02 10:00", True, "2026-06-01"),
            ("c2", "AAAA", "2026-05-03 10:00", True, "2026-06-01"),
        ]
    )
    lots, rejects, _ = validate_top_ups(top, SETTINGS, TERMS, codes, decide_codes(codes))

    assert dict(zip(rejects["source_id"], rejects["reason"], strict=True)) == {
        "neg": INVALID_AMOUNT,
        "zero": INVALID_CREDITS,
        "fax": UNKNOWN_CHANNEL,
        "c2": CODE_ALREADY_REDEEMED,
    }
    assert set(rejects["period"]) == {"2026-05"}
    by_id = lots.set_index("lot_id")
    assert sorted(by_id.index) == ["c1", "on"]
    may_2 = day_number(date(2026, 5, 2))
    assert by_id.loc["on", ["credit_units", "money_cents", "valid_from"]].tolist() == [100 * U, 1000, may_2]
    assert by_id.loc["on", "valid_until"] == may_2 + SETTINGS.validity_days
    # A code's lot: the code's credits, no money, the code's own validity.
    assert by_id.loc["c1", ["credit_units", "money_cents", "valid_until"]].tolist() == [50 * U, 0, may_2 + 30]
