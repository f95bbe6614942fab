"""Ledger properties through `month-end` (SQLite): random top-ups and usage, months
closed in order, late data, re-runs.

- With every period looked at again, the sums of every entry per (account, lot,
  kind) equal a fresh computation on all the data: months re-closed in order equal
  a fresh database that had all the data from the start; one close with
  `[ledger] late_data_months` at least the number of written periods equals the
  ledger computed from nothing with the same invoices. A repeated month-end writes
  no entry.
- With a smaller window, a close leaves the settled periods' entries as they were,
  and each period it looks at equals a fresh computation from the balances written
  at the end of the period before (what `reconcile` checks).
"""

from __future__ import annotations

import csv
import io
import json
from decimal import Decimal
from pathlib import Path

from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine
from support import SourceData, run_cli

from billing_jobs.db.billing_tables import (
    credit_balances,
    credit_entries,
    credit_inputs,
    credit_lot_states,
    credit_lots,
    credit_periods,
    credit_refunds,
)

MONTHS = ("2026-05", "2026-06", "2026-07")
# The ledger's periods: from the effective date's month (2026-03) on.
PERIODS = ("2026-03", "2026-04", *MONTHS)
ENV = {"BILLING_WORKERS": "1"}


def _close(url: str, month: str, env: dict[str, str] | None = None) -> None:
    result = run_cli(url, "month-end", "--month", month, env=env or ENV)
    assert result.code == 0, result.stderr


def _window(base: Path, late_data_months: int) -> dict[str, str]:
    config = base / "billing.toml"
    config.write_text(f"[ledger]\nlate_data_months = {late_data_months}\n", "utf-8")
    return {**ENV, "BILLING_CONFIG": str(config)}


def _entries(url: str) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for month in PERIODS:
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
    st.sampled_from([None, len(PERIODS), 12]),
)
@example(  # late compute that waives May's storage fee, which only a re-close of May invoices
    usages=[
        ("b", "2026-07", 2, Decimal("0.1436")),
        ("a", "2026-07", 27, Decimal("0.3000")),
        ("a", "2026-05", 6, Decimal("0.1496")),
    ],
    top_ups=[
        ("a", "2026-07", 4, ("wire", None, "25.00")),
        ("b", "2026-06", 12, ("online", "1000", "95.00")),
        ("b", "2026-07", 23, ("online", "1000", "95.00")),
        ("b", "2026-07", 24, ("online", "100", "10.00")),
    ],
    late_usages=[
        ("b", "2026-05", 13, Decimal("0.1960")),
        ("a", "2026-05", 8, Decimal("40.0000")),
        ("a", "2026-07", 3, Decimal("-0.0590")),
        ("a", "2026-05", 6, Decimal("-0.0065")),
    ],
    late_top_ups=[("b", "2026-05", 28, ("online", "100", "10.00"))],
    late_data_months=12,
)
def test_month_by_month_with_late_data_sums_to_a_fresh_computation(
    tmp_path_factory: object,
    usages: list,
    top_ups: list,
    late_usages: list,
    late_top_ups: list,  # type: ignore[type-arg]
    late_data_months: int | None,
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
    if late_data_months is None:
        for month in MONTHS:  # re-close: adjustment invoices, then the ledger's corrections
            _close(url, month)
    else:  # one close that looks back over every written period
        _close(url, "2026-07", _window(base, late_data_months))

    if late_data_months is None:
        # A fresh database that had all the data from the start.
        _write(fresh, usages, top_ups, "x", first=True)
        _write(fresh, late_usages, late_top_ups, "late", first=False)
        for month in MONTHS:
            _close(fresh, month)
    else:
        # The same invoices (May and June were not re-closed), and a ledger computed
        # from nothing on all the data: the ledger's tables emptied, July closed again.
        _write(fresh, usages, top_ups, "x", first=True)
        for month in MONTHS:
            _close(fresh, month)
        _write(fresh, late_usages, late_top_ups, "late", first=False)
        _forget_ledger(fresh)
        _close(fresh, "2026-07")
    assert _sums(_entries(url)) == _sums(_entries(fresh))


def _forget_ledger(url: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for table in (
                credit_entries,
                credit_lots,
                credit_periods,
                credit_refunds,
                credit_balances,
                credit_inputs,
                credit_lot_states,
            ):
                conn.execute(table.delete())
    finally:
        engine.dispose()


def _by_day(rows: list[dict[str, str]], last: str) -> dict[tuple[str, str, str, str], Decimal]:
    out: dict[tuple[str, str, str, str], Decimal] = {}
    for r in rows:
        if r["day"] <= last:
            key = (r["account_id"], r["lot_id"], r["kind"], r["day"])
            out[key] = out.get(key, Decimal(0)) + Decimal(r["credits"])
    return {k: v for k, v in out.items() if v != 0}


# No shrinking, as above.
@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
@given(
    st.lists(usage, max_size=8),
    st.lists(top_up, max_size=4),
    st.lists(usage, min_size=1, max_size=4),
    st.lists(top_up, max_size=2),
    st.sampled_from([0, 1]),
)
def test_a_small_window_leaves_settled_periods_and_agrees_from_their_balances(
    tmp_path_factory: object,
    usages: list,
    top_ups: list,
    late_usages: list,
    late_top_ups: list,  # type: ignore[type-arg]
    late_data_months: int,
) -> None:
    base: Path = tmp_path_factory.mktemp("window")  # type: ignore[attr-defined]
    url = f"sqlite:///{base / 'incremental.db'}"
    env = _window(base, late_data_months)
    _write(url, usages, top_ups, "x", first=True)
    for month in MONTHS:
        _close(url, month, env)
    before = _entries(url)
    _write(url, late_usages, late_top_ups, "late", first=False)
    _close(url, "2026-07", env)
    after = _entries(url)
    looked_at = MONTHS[len(MONTHS) - 1 - late_data_months :]
    settled_end = f"{MONTHS[len(MONTHS) - 2 - late_data_months]}-31"  # May and June: 31 days
    assert _by_day(after, settled_end) == _by_day(before, settled_end), "a settled period changed"
    found = run_cli(url, "reconcile", "--since", "2026-05", "--json", env=env)
    assert found.code in (0, 1), found.stderr
    ledger = {m["period"]: m["ledger"] for m in json.loads(found.stdout)["months"]}
    assert {p: ledger[p] for p in looked_at} == {p: [] for p in looked_at}
