"""`rules.periods`: daily charges as canonical periods, and the change a run writes."""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing_jobs.rules import periods
from billing_jobs.rules.calendar import day_number

MAY_1 = day_number(date(2026, 5, 1))
JUNE_1 = day_number(date(2026, 6, 1))

# (project, charge type, day offset from May 1 (0..44: into June), account, amount)
Day = tuple[str, str, int, str, int]
a_day = st.tuples(
    st.sampled_from(["p1", "p2"]),
    st.sampled_from(["storage_fee", "cloud_domains"]),
    st.integers(0, 44),
    st.sampled_from(["acct-a", "acct-b"]),
    st.sampled_from([0, 5_000, 10_000, 12_345]),
)


def _frame(days: list[Day]) -> pd.DataFrame:
    """One charge per (project, charge type, day): the first drawn wins."""
    seen: dict[tuple[str, str, int], tuple[str, int]] = {}
    for p, t, d, a, m in days:
        seen.setdefault((p, t, d), (a, m))
    rows = [(p, a, t, MAY_1 + d, 10_000 + m // 1_000, m) for (p, t, d), (a, m) in seen.items()]
    frame = pd.DataFrame(rows, columns=periods.DAY_COLUMNS)
    return frame.astype({"day": np.int64, "quantity_units": np.int64, "amount_units": np.int64})


def _rows(days: pd.DataFrame) -> list[tuple[object, ...]]:
    return sorted(tuple(r) for r in days[periods.DAY_COLUMNS].itertuples(index=False))


def _assert_canonical(stored: pd.DataFrame) -> None:
    """Runs (the storage fee) neither overlap nor could be merged; a month form (any
    other charge type) is one row per (project, charge type, month, account) whose
    first and last days, number of days and totals are those of the days it holds."""
    month = stored["first_day"].to_numpy().astype("datetime64[D]").astype("datetime64[M]")
    end_month = stored["last_day"].to_numpy().astype("datetime64[D]").astype("datetime64[M]")
    assert (stored["first_day"] <= stored["last_day"]).all()
    assert (month == end_month).all(), "a period spans two months"
    forms = stored.assign(month=month)
    month_form = forms["daily"].notna()
    assert (month_form == (forms["charge_type"] != "storage_fee")).all()
    months = forms.loc[month_form]
    assert not months.duplicated(["project_id", "charge_type", "month", "account_id"]).any()
    for row in months.itertuples(index=False):
        days = periods.to_days(pd.DataFrame([row], columns=forms.columns)[periods.COLUMNS])
        assert (row.first_day, row.last_day, row.days) == (days["day"].min(), days["day"].max(), len(days))
        assert (row.quantity_units, row.amount_units) == (
            days["quantity_units"].sum(),
            days["amount_units"].sum(),
        )
    runs = forms.loc[~month_form]
    ordered = runs.sort_values(["project_id", "charge_type", "first_day"]).reset_index(drop=True)
    assert (ordered["days"] == ordered["last_day"] - ordered["first_day"] + 1).all()
    for i in range(1, len(ordered)):
        before, this = ordered.iloc[i - 1], ordered.iloc[i]
        if (before["project_id"], before["charge_type"]) != (this["project_id"], this["charge_type"]):
            continue
        assert before["last_day"] < this["first_day"], "periods overlap"
        same = all(before[c] == this[c] for c in periods.VALUES) and this["month"] == before["month"]
        assert not (same and before["last_day"] + 1 == this["first_day"]), "two periods could be one"


@settings(max_examples=120, deadline=None)
@given(st.lists(a_day, max_size=60))
def test_periods_give_back_exactly_the_days_they_were_made_of(
    days: list[Day],
) -> None:
    charges = _frame(days)
    stored = periods.from_days(charges)
    _assert_canonical(stored)
    assert _rows(periods.to_days(stored)) == _rows(charges)


@settings(max_examples=120, deadline=None)
@given(st.lists(a_day, max_size=60), st.randoms(use_true_random=False))
def test_month_forms_are_the_same_whether_the_days_come_grouped_or_shuffled(
    days: list[Day], rng: object
) -> None:
    """Days that come grouped by project and charge type, in day order (as a chunk's
    reads give them), take the path without a sort; in any other order, the sorted
    one. Both give the same rows in the same order."""
    charges = _frame(days)
    months = charges.loc[charges["charge_type"] != "storage_fee"].reset_index(drop=True)
    grouped = months.sort_values(["project_id", "charge_type", "account_id", "day"], kind="stable")
    shuffled = months.sample(frac=1.0, random_state=rng.randint(0, 2**31))  # type: ignore[attr-defined]
    by_groups = periods.months_of_days(grouped.reset_index(drop=True))
    assert by_groups.equals(periods.months_of_days(shuffled.reset_index(drop=True)))
    assert by_groups.equals(periods.months_of_days(months.sort_values(["day", "project_id"])))
    _assert_canonical(by_groups)
    assert _rows(periods.to_days(by_groups)) == _rows(months)


def test_an_always_charged_month_is_one_period_and_a_month_boundary_splits_it() -> None:
    charges = _frame([("p1", "storage_fee", d, "acct-a", 10_000) for d in range(0, 40)])
    stored = periods.from_days(charges)
    assert stored[["first_day", "last_day"]].values.tolist() == [[MAY_1, MAY_1 + 30], [JUNE_1, MAY_1 + 39]]


def test_a_month_of_cloud_fees_is_one_row_per_account_and_gives_every_day_back() -> None:
    days = [("p1", "cloud_page_views", d, "acct-a", 1_000 * (d % 7)) for d in range(0, 40)]
    days.append(("p1", "cloud_page_views", 41, "acct-b", 70))
    charges = _frame(days)
    stored = periods.from_days(charges)
    assert stored[["first_day", "last_day", "days", "account_id"]].values.tolist() == [
        [MAY_1, MAY_1 + 30, 31, "acct-a"],
        [JUNE_1, MAY_1 + 39, 9, "acct-a"],
        [MAY_1 + 41, MAY_1 + 41, 1, "acct-b"],
    ]
    assert stored["daily"].iloc[2] == "0 10000 70"
    assert stored["daily"].iloc[0].startswith("0 10000 0 1 10001 1000 2 10002 2000 ")
    assert _rows(periods.to_days(stored)) == _rows(charges)


@settings(max_examples=120, deadline=None)
@given(
    st.lists(a_day, max_size=50),
    st.lists(a_day, max_size=50),
    st.integers(0, 30),
    st.integers(0, 30),
    st.integers(0, 30),
)
def test_the_change_keeps_what_lies_outside_the_window_and_writes_the_truth_inside(
    before: list[Day],
    after: list[Day],
    start: int,
    length: int,
    storage_extra: int,
) -> None:
    """May only: a window of days lo..hi (the storage fee's reaching further), the stored
    periods as they were, the truth inside the window; applied, the change leaves the
    store canonical and equal, day by day, to the old days outside and the truth inside."""
    lo = MAY_1 + start
    hi = min(lo + length, MAY_1 + 30)
    storage_hi = min(hi + storage_extra, MAY_1 + 30)
    stored = periods.from_days(_frame([d for d in before if d[2] <= 30]))

    def window_of(charge_type: pd.Series) -> tuple[np.ndarray, np.ndarray]:
        storage = (charge_type == "storage_fee").to_numpy()
        return np.full(len(charge_type), lo), np.where(storage, storage_hi, hi)

    truth_days = _frame([d for d in after if d[2] <= 30])
    w_lo, w_hi = window_of(truth_days["charge_type"])
    truth_days = truth_days.loc[(truth_days["day"] >= w_lo) & (truth_days["day"] <= w_hi)]
    s_lo, s_hi = window_of(stored["charge_type"])

    change = periods.change(stored, periods.from_days(truth_days), s_lo, s_hi)

    key = periods.COLUMNS
    kept = stored.merge(change.delete, on=key, how="left", indicator=True)
    kept = kept.loc[kept["_merge"] == "left_only", key]
    result = pd.concat([kept, change.insert[key]], ignore_index=True)
    _assert_canonical(result)
    old = periods.to_days(stored)
    o_lo, o_hi = window_of(old["charge_type"])
    outside = old.loc[(old["day"] < o_lo) | (old["day"] > o_hi)]
    assert _rows(periods.to_days(result)) == _rows(pd.concat([outside, truth_days], ignore_index=True))
    # What the change deletes is stored, what it inserts is not: no row written in vain.
    assert len(change.delete.merge(stored, on=key)) == len(change.delete)
    assert change.insert.merge(stored, on=key).empty


@settings(max_examples=60, deadline=None)
@given(st.lists(a_day, max_size=50), st.integers(0, 30), st.integers(0, 30))
def test_the_truth_already_stored_changes_nothing(days: list[Day], start: int, length: int) -> None:
    stored = periods.from_days(_frame([d for d in days if d[2] <= 30]))
    lo, hi = MAY_1 + start, min(MAY_1 + start + length, MAY_1 + 30)
    expanded = periods.to_days(stored)
    inside = expanded.loc[(expanded["day"] >= lo) & (expanded["day"] <= hi)]

    change = periods.change(
        stored, periods.from_days(inside), np.full(len(stored), lo), np.full(len(stored), hi)
    )

    assert change.empty


def test_a_night_that_adds_a_day_after_a_stored_month_extends_that_month_row() -> None:
    """The nightly's common case: the month row of May 1-9 and the 10th's charge become
    the one row of May 1-10, exactly as if built from the ten days at once."""
    days = [("p1", "cloud_bandwidth", d, "acct-a", 1_000 * d) for d in range(0, 10)]
    days += [("p2", "cloud_bandwidth", d, "acct-a", 7) for d in (3, 10)]  # p2: only its row
    stored = periods.from_days(_frame([d for d in days if d[2] < 9]))
    truth = periods.from_days(_frame([d for d in days if d[2] == 9]))
    window = np.full(len(stored), MAY_1 + 9)

    change = periods.change(stored, truth, window, window)

    assert change.delete["project_id"].tolist() == ["p1"]
    whole = periods.from_days(_frame([d for d in days if d[2] <= 9]))
    assert change.insert.equals(whole.loc[whole["project_id"] == "p1"].reset_index(drop=True))
    assert change.insert["daily"].iloc[0].endswith(" 9 10009 9000")


def test_a_month_row_edited_outside_the_jobs_is_named_when_it_cannot_be_read_back() -> None:
    stored = periods.from_days(_frame([("p2", "cloud_domains", d, "acct-a", 5_000) for d in (1, 2)]))
    for broken in ("0 10005 5000 1 10005", "0 10005 5000 1 10005 x"):
        edited = stored.assign(daily=[broken])
        named = r"project p2, cloud_domains, first_day 2026-05-02\) does not hold 2 days"
        with pytest.raises(ValueError, match=named):
            periods.to_days(edited)
