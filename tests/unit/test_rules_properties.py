"""Invariants of the rules core over random data (Hypothesis)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from billing_jobs.rules.calendar import Month, add_months, add_months_days, day_from_number, day_number
from billing_jobs.rules.invoice import KEY, LINE_COLUMNS, adjustment_lines, sort_lines
from billing_jobs.rules.lifecycle import EVENT_KINDS, build_lifecycle
from billing_jobs.rules.money import round_half_up_units, to_units
from billing_jobs.rules.storage_fee import CAP_REACHED, CHARGED, StorageRules, storage_days

FAST = settings(max_examples=20, deadline=None)  # the rules run over many projects per example
ZONES = ["UTC", "America/New_York", "Asia/Shanghai", "Pacific/Kiritimati", "Pacific/Pago_Pago"]
BASE = datetime(2026, 1, 1, tzinfo=UTC).replace(tzinfo=None)  # naive UTC, as the rules take

instants = st.integers(min_value=0, max_value=600 * 24).map(lambda h: BASE + timedelta(minutes=30 * h))


@st.composite
def lifecycles(draw: st.DrawFn) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A few projects with random creation times and random (often invalid) events."""
    n = draw(st.integers(1, 20))
    created = [draw(instants) for _ in range(n)]
    projects = pd.DataFrame(
        {
            "project_id": pd.Series([f"p{i}" for i in range(n)], dtype=object),
            "account_id": pd.Series(["acct-1"] * n, dtype=object),
            "created_at": pd.Series(created).astype("datetime64[us]"),
        }
    )
    rows = draw(
        st.lists(
            st.tuples(st.integers(0, n), instants, st.sampled_from([*EVENT_KINDS, "frozen"])),
            max_size=60,
        )
    )
    events = pd.DataFrame(
        {
            "event_id": pd.Series([f"e{i:03d}" for i in range(len(rows))], dtype=object),
            "project_id": pd.Series([f"p{p}" for p, _, _ in rows], dtype=object),  # p{n}: unknown
            "occurred_at": pd.Series([t for _, t, _ in rows], dtype="datetime64[us]"),
            "kind": pd.Series([k for _, _, k in rows], dtype=object),
        }
    )
    return projects, events


storage_rules = st.builds(
    lambda rate, cap, free, legacy, promo: StorageRules.from_values(
        effective_from=date(2026, 3, 24),
        credits_per_day=rate,
        monthly_cap=cap,
        new_project_free_months=free,
        new_project_promo_until=promo,
        legacy_free_months=legacy,
    ),
    st.decimals(min_value=0, max_value=5, places=4),
    st.decimals(min_value=0, max_value=60, places=4),
    st.integers(0, 3),
    st.integers(0, 3),
    st.one_of(st.none(), st.dates(min_value=date(2026, 1, 1), max_value=date(2027, 12, 31))),
)
months = st.builds(Month, st.integers(2026, 2027), st.integers(1, 12))


@FAST
@given(lifecycles(), storage_rules, months, st.sampled_from(ZONES))
def test_the_monthly_cap_is_never_exceeded_and_the_total_is_billable_days_times_rate_up_to_the_cap(
    lc, rules, month, tz
):
    projects, events = lc
    iv = build_lifecycle(projects, events).intervals
    days = storage_days(projects, iv.loc[iv["state"] == "active"], month, ZoneInfo(tz), rules)
    assert not days.duplicated(["project_id", "day"]).any()
    amounts = days["amount_units"].to_numpy()
    assert (amounts >= 0).all()
    assert (amounts <= rules.rate_units).all()
    per_project = days.assign(billable=days["status"].isin([CHARGED, CAP_REACHED])).groupby("project_id")
    totals = per_project["amount_units"].sum()
    billable = per_project["billable"].sum()
    assert (totals <= rules.cap_units).all()
    expected = np.minimum(billable.to_numpy(dtype=np.int64) * rules.rate_units, rules.cap_units)
    assert totals.to_numpy(dtype=np.int64).tolist() == expected.tolist()
    # Days are charged in date order: no day is charged after the cap was reached.
    ordered = days.sort_values(["project_id", "day"])
    reached = ordered["status"].eq(CAP_REACHED).groupby(ordered["project_id"]).cummax()
    assert not (reached & ordered["status"].eq(CHARGED)).any()


@FAST
@given(lifecycles())
def test_random_events_never_produce_overlapping_intervals_nor_accept_impossible_events(lc):
    projects, events = lc
    result = build_lifecycle(projects, events)
    iv = result.intervals.sort_values(["project_id", "state", "start"])
    assert (iv["start"] <= iv["end"]).all()
    same = (iv["project_id"].to_numpy()[1:] == iv["project_id"].to_numpy()[:-1]) & (
        iv["state"].to_numpy()[1:] == iv["state"].to_numpy()[:-1]
    )
    assert (iv["end"].to_numpy()[:-1][same] <= iv["start"].to_numpy()[1:][same]).all()
    # Every project has exactly one active interval opened at its creation.
    active = iv.loc[iv["state"] == "active"].merge(projects, on="project_id")
    opened = active.loc[active["start"] == active["created_at"]].groupby("project_id").size()
    assert opened.reindex(projects["project_id"]).eq(1).all()
    # Every event is either accepted or rejected with a reason.
    ev = result.events
    assert len(ev) == len(events)
    assert (ev["accepted"] == (ev["reason"] == "")).all()
    # Nothing accepted before creation, and nothing accepted after a deletion.
    accepted = ev.loc[ev["accepted"]].merge(projects, on="project_id")
    assert (accepted["occurred_at"] >= accepted["created_at"]).all()
    accepted = accepted.sort_values(["project_id", "occurred_at", "event_id"])
    deleted_before = accepted["kind"].eq("deleted").groupby(accepted["project_id"]).cumsum() - accepted[
        "kind"
    ].eq("deleted")
    assert (deleted_before == 0).all()


line_rows = st.lists(
    st.tuples(
        st.sampled_from(["a1", "a2"]),
        st.sampled_from(["p1", "p2", "p3"]),
        st.sampled_from(["storage_fee", "storage_refund", "cloud_page_views"]),
        st.integers(-(10**9), 10**9),
        st.integers(-(10**9), 10**9),
    ),
    max_size=12,
)


def lines_frame(rows: list[tuple[str, str, str, int, int]], *, with_price: bool) -> pd.DataFrame:
    df = pd.DataFrame(
        {
            "account_id": pd.Series([r[0] for r in rows], dtype=object),
            "project_id": pd.Series([r[1] for r in rows], dtype=object),
            "line_type": pd.Series([r[2] for r in rows], dtype=object),
            "quantity_units": pd.Series([r[3] for r in rows], dtype="int64"),
            "amount_units": pd.Series([r[4] for r in rows], dtype="int64"),
        }
    )
    df = df.groupby(KEY, as_index=False)[["quantity_units", "amount_units"]].sum()
    if with_price:
        df["unit_price"] = "1"
    return df


def summed(*frames: pd.DataFrame) -> dict[tuple[str, str, str], tuple[int, int]]:
    out: dict[tuple[str, str, str], tuple[int, int]] = {}
    for df in frames:
        for r in df.itertuples(index=False):
            k = (r.account_id, r.project_id, r.line_type)
            q, a = out.get(k, (0, 0))
            out[k] = (q + int(r.quantity_units), a + int(r.amount_units))
    return {k: v for k, v in out.items() if v != (0, 0)}


@FAST
@given(line_rows, line_rows)
def test_adjustment_lines_plus_what_was_invoiced_equal_the_truth(truth_rows, invoiced_rows):
    truth = lines_frame(truth_rows, with_price=True)
    invoiced = lines_frame(invoiced_rows, with_price=False)
    adjustments = adjustment_lines(truth, invoiced)
    assert summed(adjustments, invoiced) == summed(truth)
    # Only differences are written, and each key at most once.
    assert not ((adjustments["quantity_units"] == 0) & (adjustments["amount_units"] == 0)).any()
    assert not adjustments.duplicated(KEY).any()
    assert adjustment_lines(truth, truth.drop(columns="unit_price")).empty


@FAST
@given(line_rows, st.lists(st.tuples(st.integers(0, 11), st.integers(-3, 3), st.integers(-3, 3)), max_size=6))
def test_adjustment_lines_are_the_same_whether_the_invoiced_come_in_the_truths_order_or_not(
    truth_rows, edits
):
    """Invoiced lines with the truth's keys row for row are compared without a join;
    the same lines shuffled go through the join: the adjustments are the same."""
    truth = sort_lines(lines_frame(truth_rows, with_price=True)[LINE_COLUMNS])
    invoiced = truth.drop(columns="unit_price").copy()
    for row, quantity, amount in edits:
        if row < len(invoiced):
            invoiced.loc[row, "quantity_units"] += quantity
            invoiced.loc[row, "amount_units"] += amount
    aligned = adjustment_lines(truth, invoiced)
    joined = adjustment_lines(truth, invoiced.iloc[::-1].reset_index(drop=True))
    pd.testing.assert_frame_equal(aligned, joined)
    assert summed(aligned, invoiced) == summed(truth)


@FAST
@given(
    st.lists(st.integers(-(2**62), 2**62), min_size=1, max_size=5),
    st.decimals(min_value=0, max_value=1000, places=4),
)
def test_round_half_up_units_matches_exact_decimal_arithmetic(quantities, price):
    exact = [(Decimal(q) * price).quantize(Decimal(1), rounding=ROUND_HALF_UP) for q in quantities]
    if any(abs(v) >= 2**63 for v in exact):
        return  # the amount itself does not fit in 64 bits
    out = round_half_up_units(np.array(quantities, dtype=np.int64), price)
    assert out.tolist() == [int(v) for v in exact]


@FAST
@given(st.dates(min_value=date(1990, 1, 1), max_value=date(2100, 12, 31)), st.integers(0, 40))
def test_vectorized_add_months_equals_add_months(day, n):
    out = add_months_days(np.array([day_number(day)], dtype=np.int64), n)
    assert day_from_number(out[0]) == add_months(day, n)
    assert add_months(day, n).day <= day.day


def test_to_units_of_a_sum_of_tenths_is_exact():
    assert sum(to_units("0.1") for _ in range(300)) == to_units("30")
