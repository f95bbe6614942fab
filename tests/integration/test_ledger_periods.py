"""Ledger periods and late data (`credits.md`), through the commands, on SQLite and
PostgreSQL: months closed in order 2026-04..2026-09, then compute arriving late for
June. A September close finds it with `[ledger] late_data_months = 3`, not with 2;
with 2, `reconcile` reports it and names the `--ledger-from` that corrects it."""

from __future__ import annotations

import csv
import io
import json
from decimal import Decimal
from pathlib import Path

import pytest
from support import SourceData, reject_reasons, run_cli

MONTHS = ("2026-04", "2026-05", "2026-06", "2026-07", "2026-08", "2026-09")


def _config(tmp_path: Path, late_data_months: int) -> dict[str, str]:
    path = tmp_path / f"billing-{late_data_months}.toml"
    path.write_text(f"[ledger]\nlate_data_months = {late_data_months}\n", "utf-8")
    return {"BILLING_CONFIG": str(path), "BILLING_WORKERS": "1"}


def _month_end(db_url: str, env: dict[str, str], *args: str) -> str:
    result = run_cli(db_url, "month-end", *args, env=env)
    assert result.code == 0, result.stderr
    return result.stdout


def _ledger(db_url: str, month: str) -> list[dict[str, str]]:
    result = run_cli(db_url, "credits", "export", "--month", month)
    assert result.code == 0, result.stderr
    return list(csv.DictReader(io.StringIO(result.stdout)))


def _all_entries(db_url: str) -> list[dict[str, str]]:
    return [row for month in MONTHS for row in _ledger(db_url, month)]


def _platform(db_url: str) -> None:
    data = SourceData()
    data.project("p1", created="2025-11-02", account="a")
    data.project("p2", created="2025-11-02", account="b")
    data.top_up("A", "2026-04-02 09:00", "online", account="a", credits="1000", amount="95.00")
    data.top_up("B", "2026-04-03 09:00", "online", account="b", credits="100", amount="10.00")
    for n, month in enumerate(MONTHS):
        data.compute("p1", f"{month}-10 12:00", "7", usage_id=f"a-{month}")
        data.compute("p2", f"{month}-11 12:00", "2", usage_id=f"b-{month}")
        if n % 2:
            data.compute("p1", f"{month}-20 12:00", "1.5", usage_id=f"a2-{month}")
    data.write_url(db_url)


def _late_june(db_url: str) -> None:
    SourceData().compute("p1", "2026-06-15 12:00", "5", usage_id="late-june").write_url(db_url)


def _corrections(rows: list[dict[str, str]], corrects: str) -> dict[tuple[str, str, str, str], Decimal]:
    out: dict[tuple[str, str, str, str], Decimal] = {}
    for r in rows:
        if r["corrects"] == corrects:
            key = (r["account_id"], r["lot_id"], r["kind"], r["day"])
            out[key] = out.get(key, Decimal(0)) + Decimal(r["credits"])
    return out


def _closed_in_order(db_url: str, env: dict[str, str]) -> None:
    _platform(db_url)
    for month in MONTHS:
        _month_end(db_url, env, "--month", month)


def test_late_data_within_the_window_is_corrected_by_the_next_close(db_url: str, tmp_path: Path) -> None:
    env = _config(tmp_path, 3)
    _closed_in_order(db_url, env)
    _late_june(db_url)
    _month_end(db_url, env, "--month", "2026-09")
    september = _ledger(db_url, "2026-09")
    assert _corrections(september, "2026-06") == {("a", "A", "draw", "2026-06-15"): Decimal(5)}
    assert {r["period"] for r in september} == {"2026-09"}
    before = _all_entries(db_url)
    _month_end(db_url, env, "--month", "2026-09")
    assert _all_entries(db_url) == before, "a repeated month-end wrote entries"
    result = run_cli(db_url, "reconcile", "--since", "2026-04", env=env)
    assert result.code == 0, result.stdout + result.stderr


def test_late_data_older_than_the_window_is_found_by_reconcile_and_corrected_on_request(
    db_url: str, tmp_path: Path
) -> None:
    env = _config(tmp_path, 2)
    _closed_in_order(db_url, env)
    _late_june(db_url)
    before = _all_entries(db_url)
    _month_end(db_url, env, "--month", "2026-09")
    assert _all_entries(db_url) == before, "June is settled for a September close looking back 2 months"

    found = run_cli(db_url, "reconcile", "--since", "2026-04", env=env)
    assert found.code == 1, found.stdout + found.stderr
    assert "billing-jobs month-end --month 2026-09 --ledger-from 2026-06" in found.stdout
    rows = [line.split() for line in found.stdout.splitlines() if " ledger " in f" {line} "]
    assert rows == [["2026-06", "ledger", "a", "A", "draw", "36", "41", "5"]]
    as_json = run_cli(db_url, "reconcile", "--since", "2026-04", "--json", env=env)
    record = json.loads(as_json.stdout)
    differing = {m["period"]: m["ledger"] for m in record["months"] if m["ledger"]}
    assert list(differing) == ["2026-06"]
    assert differing["2026-06"][0]["written"] == "36"
    assert differing["2026-06"][0]["recomputed"] == "41"
    assert record["ledger_fix"] == ["billing-jobs month-end --month 2026-09 --ledger-from 2026-06"]

    preview = run_cli(
        db_url, "month-end", "--month", "2026-09", "--ledger-from", "2026-06", "--dry-run", env=env
    )
    assert preview.code == 0, preview.stderr
    assert _all_entries(db_url) == before, "a dry run wrote entries"

    _month_end(db_url, env, "--month", "2026-09", "--ledger-from", "2026-06")
    corrected = _all_entries(db_url)
    new = [r for r in corrected if r not in before]
    assert new
    assert all(r["period"] == "2026-09" and r["corrects"] == "2026-06" for r in new)
    assert _corrections(new, "2026-06") == {("a", "A", "draw", "2026-06-15"): Decimal(5)}

    _month_end(db_url, env, "--month", "2026-09", "--ledger-from", "2026-06")
    assert _all_entries(db_url) == corrected, "a repeated month-end wrote entries"
    clean = run_cli(db_url, "reconcile", "--since", "2026-04", env=env)
    assert clean.code == 0, clean.stdout + clean.stderr


def test_a_close_reads_the_window_not_the_history(db_url: str, tmp_path: Path) -> None:
    env = _config(tmp_path, 2)
    _closed_in_order(db_url, env)
    result = run_cli(db_url, "runs", "--json", env=env)
    assert result.code == 0, result.stderr
    runs = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    read = {r["period"]: r["counts"]["ledger_periods_read"] for r in runs if r["job"] == "month-end"}
    # April is the first close: it reads from the effective date (March 24) on.
    assert read == {
        "2026-04": 2,
        "2026-05": 3,
        "2026-06": 3,
        "2026-07": 3,
        "2026-08": 3,
        "2026-09": 3,
    }


@pytest.mark.parametrize("how", ["approve", "finalize"])
def test_ledger_from_reaches_the_ledger_of_an_approved_or_sharded_close(
    db_url: str, tmp_path: Path, how: str
) -> None:
    """`--ledger-from` given to `--approve M` (after `--hold`) or to `--finalize` (after
    the shards) corrects the settled period as a plain close does."""
    env = _config(tmp_path, 2)
    _platform(db_url)
    for month in MONTHS[:-1]:
        _month_end(db_url, env, "--month", month)
    _late_june(db_url)
    before = _all_entries(db_url)
    if how == "approve":
        _month_end(db_url, env, "--month", "2026-09", "--hold")
        assert _all_entries(db_url) == before, "a held close wrote entries"
        _month_end(db_url, env, "--approve", "2026-09", "--ledger-from", "2026-06")
    else:
        for shard in ("0/2", "1/2"):
            _month_end(db_url, env, "--month", "2026-09", "--shard", shard)
        assert _all_entries(db_url) == before, "a shard wrote entries"
        _month_end(db_url, env, "--month", "2026-09", "--finalize", "--ledger-from", "2026-06")
    new = [r for r in _all_entries(db_url) if r not in before]
    assert _corrections(new, "2026-06") == {("a", "A", "draw", "2026-06-15"): Decimal(5)}
    assert all(r["period"] == "2026-09" for r in new)
    clean = run_cli(db_url, "reconcile", "--since", "2026-04", env=env)
    assert clean.code == 0, clean.stdout + clean.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--month", "2026-05", "--ledger-from", "2026-06"), "after the month closed"),
        (("--month", "2026-05", "--ledger-from", "June"), "expected a month YYYY-MM"),
        (("--month", "2026-05", "--ledger-from", "2026-04", "--hold"), "--ledger-from takes neither"),
    ],
)
def test_a_bad_ledger_from_is_one_line_and_exit_2(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    url = f"sqlite:///{tmp_path / 'bad.db'}"
    result = run_cli(url, "month-end", *args)
    assert result.code == 2
    assert message in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


@pytest.mark.parametrize("value", ["-1", '"two"', "1.5"])
def test_a_bad_late_data_months_is_one_line_and_exit_2(tmp_path: Path, value: str) -> None:
    path = tmp_path / "billing.toml"
    path.write_text(f"[ledger]\nlate_data_months = {value}\n", "utf-8")
    result = run_cli(None, "credits", "quote", "--credits", "100", env={"BILLING_CONFIG": str(path)})
    assert result.code == 2
    assert "ledger.late_data_months" in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


def test_a_code_redeemed_in_a_settled_period_is_still_redeemed_for_a_later_close(
    db_url: str, tmp_path: Path
) -> None:
    env = _config(tmp_path, 0)  # every close settles all earlier periods
    data = SourceData()
    data.project("p1", created="2025-11-02", account="a")
    data.code("K", "100", "2027-01-01", 365)
    data.top_up("T1", "2026-04-05 08:00", "code", account="a", code="K")
    data.top_up("T2", "2026-08-05 08:00", "code", account="a", code="K")
    data.write_url(db_url)
    for month in MONTHS:
        _month_end(db_url, env, "--month", month)
    assert ("top_ups", "T2", "code_already_redeemed") in reject_reasons(db_url)
    funded = [r for r in _all_entries(db_url) if r["kind"] == "fund"]
    assert [(r["lot_id"], r["credits"]) for r in funded] == [("T1", "100")]


def _sums(rows: list[dict[str, str]]) -> dict[tuple[str, str, str], Decimal]:
    out: dict[tuple[str, str, str], Decimal] = {}
    for r in rows:
        key = (r["account_id"], r["lot_id"], r["kind"])
        out[key] = out.get(key, Decimal(0)) + Decimal(r["credits"])
    return {k: v for k, v in out.items() if v != 0}


def test_a_window_of_0_equals_looking_at_every_period_with_expired_lots_restores_and_refunds(
    db_url: str, tmp_path: Path
) -> None:
    """Lots that expired in settled periods are left out of the state a close starts
    from: months closed in order settling every earlier period write the same ledger
    as closes that look at every period again."""
    whole = f"sqlite:///{tmp_path / 'whole.db'}"
    for url in (db_url, whole):
        data = SourceData()
        data.project("p1", created="2025-11-02", account="a")
        data.code("K", "100", "2027-01-01", 10)
        data.top_up("T1", "2026-04-02 08:00", "code", account="a", code="K")
        data.compute("p1", "2026-04-05 12:00", "5", usage_id="u1")
        data.compute("p1", "2026-04-20 12:00", "3", usage_id="u2")
        data.top_up("T2", "2026-06-01 08:00", "online", account="a", credits="1000", amount="95.00")
        data.top_up("T3", "2026-06-03 08:00", "online", account="a", credits="100", amount="10.00")
        data.compute("p1", "2026-07-08 12:00", "40", usage_id="u3")
        data.compute("p1", "2026-07-09 12:00", "-12", usage_id="u4")
        data.refund_request("R1", "2026-08-10 10:00", account="a")
        data.compute("p1", "2026-09-02 12:00", "4", usage_id="u5")
        data.write_url(url)
    env, every = _config(tmp_path, 0), _config(tmp_path, 12)
    for month in MONTHS:
        _month_end(db_url, env, "--month", month)
        _month_end(whole, every, "--month", month)
    got = _sums(_all_entries(db_url))
    assert got == _sums(_all_entries(whole))
    assert got[("a", "T1", "expire")] == Decimal(95)
    assert ("a", "T2", "refund") in got
    assert run_cli(db_url, "reconcile", "--since", "2026-04", env=env).code == 0
