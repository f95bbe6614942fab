"""Ledger properties through `month-end` (SQLite): random top-ups and usage, months
closed in order, late data, re-runs. The sums of every entry per
(account, lot, kind) always equal those of a fresh database that had all the data
from the start; a repeated month-end writes no entry."""

from __future__ import annotations

import csv
import io
from decimal import Decimal
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from support import SourceData, run_cli

MONTHS = ("2026-05", "2026-06", "2026-07")
ENV = {"BILLING_WORKERS": "1"}


def _close(url: str, month: str) -> None:
    result = run_cli(url, "month-end", "--month", month, env=ENV)
    assert result.code == 0, result.stderr


def _entries(url: str) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for month in MONTHS:
        result = run_cli(url, "credits", "export", "--month", month)
        assert result.code == 0, result.stderr
        rows.extend(csv.DictReader(io.StringIO(result.stdout)))
    return rows


def _sums(rows: list[dict[str, str]]) -> dict[tuple[str, str, str], Decimal]:
    out: dict[tuple[str, str, str], Decimal] = {}
    for r in rows:
        key = (r["account_id"], r["lot_id"], r["kind"])
        out[key] = out.get(key, Decimal(0)) + Decimal(r["credits"])
    return {k: v for k, v in out.items() if v != 0}


usage = st.tuples(
    st.sampled_from(["a", "b"]),
    st.sampled_from(["2026-05", "2026-06", "2026-07"]),
    st.integers(1, 28),
    st.decimals(min_value=Decimal("-3"), max_value=Decimal("40"), places=4),
)
top_up = st.tuples(
    st.sampled_from(["a", "b"]),
    st.sampled_from(["2026-05", "2026-06", "2026-07"]),
    st.integers(1, 28),
    st.sampled_from([("online", "100", "10.00"), ("online", "1000", "95.00"), ("wire", None, "25.00")]),
)


def _write(
    url: str,
    usages: list[tuple[str, str, int, Decimal]],
    top_ups: list[tuple[str, str, int, tuple[str, str | None, str]]],
    tag: str,
    *,
    first: bool,
) -> None:
    data = SourceData()
    if first:
        data.project("pa", created="2025-11-02", account="a")
        data.project("pb", created="2026-05-02 10:00", account="b")
    for i, (account, month, day, credits) in enumerate(usages):
        data.compute(f"p{account}", f"{month}-{day:02d} 12:00", str(credits), usage_id=f"{tag}-u{i}")
    for i, (account, month, day, (channel, credits, amount)) in enumerate(top_ups):
        data.top_up(
            f"{tag}-t{i}",
            f"{month}-{day:02d} 09:00",
            channel,
            account=account,
            credits=credits,
            amount=amount,
            known=False,
        )
    data.write_url(url)


# No shrinking: each example runs a dozen month-ends; a failure is reported as drawn.
@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
@given(
    st.lists(usage, max_size=8),
    st.lists(top_up, max_size=4),
    st.lists(usage, max_size=4),
    st.lists(top_up, max_size=2),
)
def test_month_by_month_with_late_data_sums_to_a_fresh_computation(
    tmp_path_factory: object,
    usages: list,
    top_ups: list,
    late_usages: list,
    late_top_ups: list,  # type: ignore[type-arg]
) -> None:
    base: Path = tmp_path_factory.mktemp("ledger")  # type: ignore[attr-defined]
    url = f"sqlite:///{base / 'incremental.db'}"
    fresh = f"sqlite:///{base / 'fresh.db'}"
    _write(url, usages, top_ups, "x", first=True)
    for month in MONTHS:
        _close(url, month)
    before = _entries(url)
    _close(url, "2026-07")
    assert _entries(url) == before, "a repeated month-end wrote entries"
    _write(url, late_usages, late_top_ups, "late", first=False)
    for month in MONTHS:  # re-close: adjustment invoices, then the ledger's corrections
        _close(url, month)

    _write(fresh, usages, top_ups, "x", first=True)
    _write(fresh, late_usages, late_top_ups, "late", first=False)
    for month in MONTHS:
        _close(fresh, month)
    assert _sums(_entries(url)) == _sums(_entries(fresh))
