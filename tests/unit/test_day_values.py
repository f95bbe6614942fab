"""`rules.day_values`: a month of values per day as one row (the ledger's stored compute)."""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing_jobs.rules import day_values
from billing_jobs.rules.calendar import day_number

MAY_1 = day_number(date(2026, 5, 1))
JUNE_1 = day_number(date(2026, 6, 1))

# (account, day offset from May 1 (0..70: into July), units, negative included)
a_day = st.tuples(
    st.sampled_from(["acct-b", "acct-a", "acct-\u00e9"]),
    st.integers(0, 70),
    st.integers(-20_000, 3_000_000_000),
)


def _frame(days: list[tuple[str, int, int]]) -> pd.DataFrame:
    seen: dict[tuple[str, int], int] = {}
    for account, offset, units in days:
        seen.setdefault((account, MAY_1 + offset), units)
    rows = [(a, d, u) for (a, d), u in seen.items()]
    return pd.DataFrame(rows, columns=["account_id", "day", "units"]).astype(
        {"day": np.int64, "units": np.int64}
    )


@settings(max_examples=150, deadline=None)
@given(st.lists(a_day, max_size=80))
def test_the_month_form_gives_back_exactly_the_days_it_was_made_of(days: list[tuple[str, int, int]]) -> None:
    frame = _frame(days)
    months = day_values.to_months(frame)

    assert not months.duplicated(["account_id", "day"]).any()
    assert set(months["day"]) <= {MAY_1, JUNE_1, day_number(date(2026, 7, 1))}
    back = day_values.to_days(months)
    assert sorted(map(tuple, back.itertuples(index=False))) == sorted(
        map(tuple, frame.itertuples(index=False))
    )
    totals = frame.assign(day=day_values.month_start(frame["day"].to_numpy())).groupby(["account_id", "day"])
    assert (
        dict(zip(zip(months["account_id"], months["day"], strict=True), months["units"], strict=True))
        == totals["units"].sum().to_dict()
    )
    # One set of days has one form, whatever order its rows come in.
    shuffled = day_values.to_months(frame.sample(frac=1.0, random_state=7))
    assert shuffled.equals(months)


def test_a_month_is_one_row_with_each_days_offset_and_units() -> None:
    frame = pd.DataFrame(
        {
            "account_id": ["a", "a", "a", "b"],
            "day": [MAY_1 + 30, MAY_1, JUNE_1, MAY_1 + 4],
            "units": [7, 120, 5, -3],
        }
    )
    months = day_values.to_months(frame)
    assert months.to_dict("records") == [
        {"account_id": "a", "day": MAY_1, "units": 127, "daily": "0 120 30 7"},
        {"account_id": "a", "day": JUNE_1, "units": 5, "daily": "0 5"},
        {"account_id": "b", "day": MAY_1, "units": -3, "daily": "4 -3"},
    ]


def test_two_values_for_one_day_or_an_unreadable_text_are_refused() -> None:
    with pytest.raises(ValueError, match="two values for one day"):
        day_values.to_months(pd.DataFrame({"account_id": ["a", "a"], "day": [MAY_1, MAY_1], "units": [1, 2]}))
    with pytest.raises(ValueError, match="not a list of"):
        day_values.to_days(pd.DataFrame({"account_id": ["a"], "day": [MAY_1], "daily": ["0 1 2"]}))
