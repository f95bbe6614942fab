"""What a ledger write keeps in the parent process: the entries summed per kind (exact
integers, the same whatever the chunks), and each chunk's part of the month's compute
found by a binary search in a frame in account order."""

from __future__ import annotations

import itertools
from datetime import date

import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from billing_jobs.jobs.ledger import KindTotals, KnownCompute, add_totals, totals_by_kind

KINDS = ("fund", "draw", "restore", "expire", "arrears")

entry = st.tuples(
    st.sampled_from(KINDS),
    st.sampled_from(["", "2026-04"]),
    st.integers(-(10**15), 10**15),
    st.none() | st.integers(-(10**12), 10**12),
)


def _entries(rows: list[tuple[str, str, int, int | None]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "kind": [r[0] for r in rows],
            "corrects": [r[1] for r in rows],
            "credit_units": pd.Series([r[2] for r in rows], dtype="int64"),
            "money_cents": pd.Series([r[3] for r in rows], dtype=object),
        }
    )


@settings(max_examples=200, deadline=None)
@given(st.lists(entry, max_size=40), st.lists(st.integers(0, 40), max_size=4))
def test_totals_per_chunk_add_up_to_the_totals_of_all_entries(
    rows: list[tuple[str, str, int, int | None]], cuts: list[int]
) -> None:
    bounds = sorted({0, len(rows), *(min(c, len(rows)) for c in cuts)})
    summed: dict[str, KindTotals] = {}
    for lo, hi in itertools.pairwise(bounds):
        add_totals(summed, totals_by_kind(_entries(rows[lo:hi])))
    expected: dict[str, KindTotals] = {}
    for kind, corrects, credits, money in rows:
        was = expected.get(kind, KindTotals())
        expected[kind] = KindTotals(
            was.entries + 1,
            was.corrections + (corrects != ""),
            was.credit_units + credits,
            was.money_cents if money is None else (was.money_cents or 0) + money,
        )
    assert summed == expected


def test_a_kind_without_money_has_none_and_money_of_zero_is_zero() -> None:
    totals = totals_by_kind(_entries([("draw", "", 5, None), ("fund", "", 7, 0), ("fund", "2026-04", 1, 3)]))
    assert totals == {"draw": KindTotals(1, 0, 5, None), "fund": KindTotals(2, 1, 8, 3)}
    assert totals_by_kind(_entries([])) == {}


ids = st.text(alphabet="aBz-é0", min_size=1, max_size=4)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(ids, st.integers(0, 30)), max_size=30), st.lists(ids, max_size=6))
def test_a_chunks_part_of_the_known_compute_is_that_of_its_accounts(
    rows: list[tuple[str, int]], accounts: list[str]
) -> None:
    parts = [
        pd.DataFrame(
            {
                "account_id": [a for a, _ in rows[i : i + 7]],
                "day": [d for _, d in rows[i : i + 7]],
                "compute_units": list(range(i, i + len(rows[i : i + 7]))),
            }
        )
        for i in range(0, len(rows), 7)
    ]
    known = KnownCompute.of_parts(date(2026, 5, 1), date(2026, 5, 31), parts)
    ordered = known.frame["account_id"].tolist()
    assert ordered == sorted(a for a, _ in rows)  # code-point order, stable
    mine = sorted(set(accounts))
    got = known.of(mine).frame
    want = [(a, d, i) for i, (a, d) in enumerate(rows) if a in set(mine)]
    assert sorted(zip(got["account_id"], got["day"], got["compute_units"], strict=True)) == sorted(want)
