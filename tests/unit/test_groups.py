"""`rules.groups`: rows that come grouped and in day order are summed without a sort,
and anything else is told apart (the callers then sort)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from billing_jobs.frames import pd
from billing_jobs.rules.groups import sums_together, together


def _keys(*columns: list[str]) -> tuple[np.ndarray, ...]:
    return tuple(np.array(c, dtype=object) for c in columns)


def test_groups_that_come_together_in_day_order_are_found_with_their_sums() -> None:
    keys = _keys(["p1", "p1", "p2", "p2", "p2"], ["a", "a", "a", "b", "b"])
    day = np.array([3, 5, 1, 1, 2])
    summed = sums_together(keys, day, (np.array([1, 2, 3, 4, 5]),))
    assert summed is not None
    first, rows, (sums,) = summed
    assert first.tolist() == [0, 2, 3]
    assert rows.tolist() == [2, 1, 2]
    assert sums.tolist() == [3, 3, 9]


def test_a_group_that_comes_back_later_or_days_out_of_order_are_not_together() -> None:
    assert together(_keys(["p1", "p2", "p1"]), np.array([1, 1, 2])) is None  # p1 comes back
    assert together(_keys(["p1", "p1"]), np.array([2, 1])) is None  # days out of order
    assert together(_keys(["p1", "p1"]), np.array([2, 2])) is None  # a day twice
    assert together(_keys([]), np.array([], dtype=np.int64)) is not None


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["p1", "p2", "p3"]), st.integers(0, 9), st.integers(-50, 50)), max_size=40
    )
)
def test_together_agrees_with_a_group_by_whenever_it_answers(rows: list[tuple[str, int, int]]) -> None:
    frame = pd.DataFrame(rows, columns=["project_id", "day", "units"]).drop_duplicates(["project_id", "day"])
    for candidate in (frame, frame.sort_values(["project_id", "day"], kind="stable")):
        summed = sums_together(
            _keys(candidate["project_id"].tolist()),
            candidate["day"].to_numpy(dtype=np.int64),
            (candidate["units"].to_numpy(dtype=np.int64),),
        )
        truth = candidate.groupby("project_id", sort=False)["units"].agg(["size", "sum"])
        if summed is None:
            assert candidate is frame, "sorted rows are always together"
            continue
        first, rows_of, (sums,) = summed
        ids = candidate["project_id"].to_numpy(dtype=object)[first].tolist()
        assert ids == truth.index.tolist()
        assert rows_of.tolist() == truth["size"].tolist()
        assert sums.tolist() == truth["sum"].tolist()
