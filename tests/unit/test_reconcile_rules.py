"""`rules.reconcile`: where invoiced sums and recomputed or stored sums disagree."""

from __future__ import annotations

import pandas as pd

from billing_jobs.rules.reconcile import COLUMNS, charge_lines, differences

LINE = ["account_id", "project_id", "line_type", "quantity_units", "amount_units"]


def frame(*rows: tuple[str, str, str, int, int]) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=LINE) if rows else pd.DataFrame(columns=LINE)


def as_rows(found: pd.DataFrame) -> list[tuple[object, ...]]:
    assert list(found.columns) == COLUMNS
    return [tuple(r) for r in found.itertuples(index=False)]


def test_equal_sums_give_no_difference_however_the_rows_are_split() -> None:
    invoiced = frame(("a", "p1", "storage_fee", 290_000, 290_000))
    split = frame(("a", "p1", "storage_fee", 100_000, 100_000), ("a", "p1", "storage_fee", 190_000, 190_000))
    assert differences(invoiced, split).empty
    assert differences(frame(), frame()).empty


def test_a_difference_is_reported_per_account_and_line_type_with_both_sides_totals() -> None:
    invoiced = frame(
        ("b", "p2", "cloud_page_views", 123_450_000, 123_450),
        ("a", "p1", "storage_fee", 290_000, 290_000),
        ("a", "p3", "storage_fee", 290_000, 290_000),
    )
    recomputed = frame(
        ("a", "p1", "storage_fee", 290_000, 290_000),
        ("a", "p3", "storage_fee", 290_000, 290_000),
        ("a", "p3", "storage_refund", 10_000, -290_000),
        ("b", "p2", "cloud_page_views", 133_450_000, 133_450),
    )
    assert as_rows(differences(invoiced, recomputed)) == [
        ("a", "storage_refund", 0, 0, 10_000, -290_000, -290_000),
        ("b", "cloud_page_views", 123_450_000, 123_450, 133_450_000, 133_450, 10_000),
    ]


def test_differences_of_projects_that_cancel_out_in_the_account_are_still_reported() -> None:
    invoiced = frame(("a", "p1", "storage_fee", 10_000, 10_000), ("a", "p2", "storage_fee", 0, 0))
    moved = frame(("a", "p1", "storage_fee", 0, 0), ("a", "p2", "storage_fee", 10_000, 10_000))
    assert as_rows(differences(invoiced, moved)) == [("a", "storage_fee", 10_000, 10_000, 10_000, 10_000, 0)]


def test_the_waiver_refund_is_not_a_daily_charge() -> None:
    lines = frame(
        ("a", "p1", "storage_fee", 290_000, 290_000),
        ("a", "p1", "storage_refund", 10_000, -290_000),
        ("a", "p1", "cloud_domains", 10_000, 1_000),
    )
    assert sorted(charge_lines(lines)["line_type"]) == ["cloud_domains", "storage_fee"]
