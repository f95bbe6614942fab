"""The worked examples C1-C15 of `credits.md`, through the commands, on SQLite and
PostgreSQL: source rows in, `month-end`, then the ledger export and balances out."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import create_engine, delete, insert
from support import SourceData, reject_reasons, run_cli

from billing_jobs.db.source_tables import redemption_codes, refund_requests, source_metadata
from billing_jobs.rules.codes import ALPHABET, is_valid

NO_CHUNK_ENV = {"BILLING_WORKERS": "1"}


def close(db_url: str, *months: str, env: dict[str, str] | None = None) -> None:
    for month in months:
        result = run_cli(db_url, "month-end", "--month", month, env=env or NO_CHUNK_ENV)
        assert result.code == 0, result.stderr


def ledger(db_url: str, month: str) -> list[dict[str, str]]:
    result = run_cli(db_url, "credits", "export", "--month", month)
    assert result.code == 0, result.stderr
    return list(csv.DictReader(io.StringIO(result.stdout)))


def sums(rows: list[dict[str, str]]) -> dict[tuple[str, str, str, str], Decimal]:
    """credits summed per (account, lot, kind, day)."""
    out: dict[tuple[str, str, str, str], Decimal] = {}
    for r in rows:
        key = (r["account_id"], r["lot_id"], r["kind"], r["day"])
        out[key] = out.get(key, Decimal(0)) + Decimal(r["credits"])
    return out


def balance(db_url: str, account: str, day: str) -> dict[str, object]:
    result = run_cli(db_url, "credits", "balance", "--account", account, "--date", day, "--json")
    assert result.code == 0, result.stderr
    parsed: dict[str, object] = json.loads(result.stdout)
    return parsed


@pytest.mark.parametrize(
    ("credits", "amount"),
    [
        ("100", "10.00"),
        ("999", "99.90"),
        ("1000", "95.00"),
        ("4999", "474.91"),
        ("5000", "450.00"),
        ("25000", "2125.00"),
    ],
)
def test_c1_quote_prices_a_top_up_at_its_tier(credits: str, amount: str) -> None:
    result = run_cli(None, "credits", "quote", "--credits", credits, "--date", "2026-05-01", "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["amount"] == amount


def test_c1_quote_below_the_smallest_top_up_exits_2_with_one_line() -> None:
    result = run_cli(None, "credits", "quote", "--credits", "50")
    assert result.code == 2
    assert "below the smallest top-up" in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("amount", "day", "credits"),
    [
        ("460.00", "2026-05-01", "5111.1111"),
        ("449.99", "2026-05-01", "4736.7368"),
        ("460.00", "2026-03-25", "4600"),
    ],
)
def test_c2_to_c4_quote_what_a_wire_buys(amount: str, day: str, credits: str) -> None:
    result = run_cli(None, "credits", "quote", "--amount", amount, "--date", day, "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["credits"] == credits


def test_c2_to_c5_wires_become_lots_or_are_rejected(db_url: str) -> None:
    data = SourceData()
    data.top_up("W2", "2026-05-01 09:00", "wire", account="a", amount="460.00")
    data.top_up("W3", "2026-05-01 09:00", "wire", account="a", amount="449.99")
    data.top_up("W4", "2026-03-25 09:00", "wire", account="a", amount="460.00")
    data.top_up("W5", "2026-05-01 09:00", "wire", account="a", amount="9.99")
    data.write_url(db_url)
    close(db_url, "2026-05")
    funds = {
        (r["lot_id"], r["credits"], r["money"]) for r in ledger(db_url, "2026-05") if r["kind"] == "fund"
    }
    assert ("W2", "5111.1111", "460.00") in funds
    assert ("W3", "4736.7368", "449.99") in funds
    # W4 was paid in March: its fund entry is in March's period, written by the same close.
    march = ledger(db_url, "2026-03")
    assert [(r["lot_id"], r["credits"]) for r in march if r["kind"] == "fund"] == [("W4", "4600")]
    assert ("top_ups", "W5", "below_smallest_top_up") in reject_reasons(db_url)
    lots = {lot["lot_id"]: lot for lot in balance(db_url, "a", "2026-05-31")["lots"]}  # type: ignore[union-attr]
    assert lots["W2"]["valid_until"] == "2027-05-01"


def _c6(data: SourceData) -> SourceData:
    data.project("p1", created="2025-11-02", account="a")
    data.top_up("A", "2026-05-01 10:00", "online", account="a", credits="1000", amount="95.00")
    data.code("CODE-B", "50", "2026-12-31", 30)
    data.top_up("B", "2026-05-10 09:00", "code", account="a", code="CODE-B")
    data.compute("p1", "2026-05-15 12:00", "60")
    return data


def test_c6_the_code_lot_that_expires_first_gives_first(db_url: str) -> None:
    _c6(SourceData()).write_url(db_url)
    close(db_url, "2026-05")
    got = sums(ledger(db_url, "2026-05"))
    assert got[("a", "B", "draw", "2026-05-15")] == Decimal(50)
    assert got[("a", "A", "draw", "2026-05-15")] == Decimal(10)


def test_c7_a_lot_expires_and_a_later_draw_becomes_arrears(db_url: str) -> None:
    data = SourceData()
    data.project("p1", created="2025-11-02", account="a")
    data.code("C7", "100", "2026-12-31", 10)
    data.top_up("C", "2026-05-01 08:00", "code", account="a", code="C7")
    data.compute("p1", "2026-05-10 12:00", "5")
    data.compute("p1", "2026-05-11 12:00", "5")
    data.write_url(db_url)
    close(db_url, "2026-05")
    got = sums(ledger(db_url, "2026-05"))
    assert got[("a", "C", "draw", "2026-05-10")] == Decimal(5)
    assert got[("a", "C", "expire", "2026-05-10")] == Decimal(95)
    assert got[("a", "", "arrears", "2026-05-11")] == Decimal(5)


def test_c8_a_refund_returns_what_is_held_pro_rata(db_url: str) -> None:
    data = SourceData()
    data.project("p1", created="2025-11-02", account="a")
    data.top_up("A", "2026-05-01 10:00", "online", account="a", credits="1000", amount="95.00")
    data.compute("p1", "2026-05-15 12:00", "400")
    data.refund_request("R1", "2026-06-01 10:00", account="a")
    data.write_url(db_url)
    close(db_url, "2026-05", "2026-06")
    refunds = [r for r in ledger(db_url, "2026-06") if r["kind"] == "refund"]
    assert [(r["lot_id"], r["credits"], r["money"]) for r in refunds] == [("A", "600", "57.00")]


def test_c9_refund_money_is_rounded_half_up(db_url: str) -> None:
    data = SourceData()
    data.project("p1", created="2025-11-02", account="a")
    data.top_up("A", "2026-05-01 10:00", "online", account="a", credits="4999", amount="474.91")
    data.compute("p1", "2026-05-15 12:00", "1234.5678")
    data.refund_request("R1", "2026-05-20 10:00", account="a")
    data.write_url(db_url)
    close(db_url, "2026-05")
    refunds = [r for r in ledger(db_url, "2026-05") if r["kind"] == "refund"]
    assert [(r["credits"], r["money"]) for r in refunds] == [("3764.4322", "357.62")]


def test_c10_an_unpaid_invoice_becomes_arrears_repaid_by_the_next_top_up(db_url: str) -> None:
    data = SourceData()
    data.project("p1", created="2025-11-02", account="a")  # May: 29 credits of storage fee
    data.top_up("T", "2026-06-03 12:00", "online", account="a", credits="100", amount="10.00")
    data.write_url(db_url)
    close(db_url, "2026-05", "2026-06")
    may = sums(ledger(db_url, "2026-05"))
    assert may[("a", "", "arrears", "2026-05-31")] == Decimal(29)
    june = sums(ledger(db_url, "2026-06"))
    assert june[("a", "T", "repay", "2026-06-03")] == Decimal(29)
    assert june[("a", "", "arrears", "2026-06-03")] == Decimal(-29)
    lots = {lot["lot_id"]: lot for lot in balance(db_url, "a", "2026-06-03")["lots"]}  # type: ignore[union-attr]
    assert lots["T"]["held"] == "71"


def test_c11_of_two_lots_valid_until_the_same_day_the_code_lot_goes_first(db_url: str) -> None:
    data = SourceData()
    data.project("p1", created="2025-11-02", account="a")
    data.top_up("P", "2026-05-01 10:00", "online", account="a", credits="100", amount="10.00")
    data.code("C11", "100", "2026-12-31", 365)
    data.top_up("F", "2026-05-01 11:00", "code", account="a", code="C11")
    data.compute("p1", "2026-05-02 12:00", "30")
    data.write_url(db_url)
    close(db_url, "2026-05")
    got = sums(ledger(db_url, "2026-05"))
    assert got[("a", "F", "draw", "2026-05-02")] == Decimal(30)
    assert ("a", "P", "draw", "2026-05-02") not in got


def test_c12_a_code_gives_credits_once_and_not_after_its_redeem_by(db_url: str) -> None:
    data = SourceData()
    data.code("TWICE", "50", "2026-12-31", 30)
    data.code("LATE", "50", "2026-05-05", 30)
    data.top_up("first", "2026-05-01 10:00", "code", account="a", code="TWICE")
    data.top_up("second", "2026-05-02 10:00", "code", account="b", code="TWICE")
    data.top_up("late", "2026-05-05 00:00", "code", account="a", code="LATE")
    data.top_up("nope", "2026-05-05 00:00", "code", account="a", code="NO-SUCH-CODE")
    data.write_url(db_url)
    close(db_url, "2026-05")
    reasons = reject_reasons(db_url)
    assert ("top_ups", "second", "code_already_redeemed") in reasons
    assert ("top_ups", "late", "code_expired") in reasons
    assert ("top_ups", "nope", "unknown_code") in reasons
    funds = [r["lot_id"] for r in ledger(db_url, "2026-05") if r["kind"] == "fund"]
    assert funds == ["first"]
    listed = run_cli(db_url, "credits", "exceptions", "--month", "2026-05")
    assert listed.code == 0
    assert "code_already_redeemed" in listed.stdout
    assert "code_expired" in listed.stdout


def test_c13_a_reversal_restores_in_the_reverse_draw_order(db_url: str) -> None:
    data = _c6(SourceData())
    data.compute("p1", "2026-05-20 12:00", "-5")
    data.write_url(db_url)
    close(db_url, "2026-05")
    got = sums(ledger(db_url, "2026-05"))
    assert got[("a", "A", "restore", "2026-05-20")] == Decimal(5)
    assert ("a", "B", "restore", "2026-05-20") not in got


def test_c14_a_refund_request_with_only_a_code_lot_refunds_nothing(db_url: str) -> None:
    data = SourceData()
    data.code("C14", "50", "2026-12-31", 60)
    data.top_up("B", "2026-05-01 10:00", "code", account="a", code="C14")
    data.refund_request("R14", "2026-05-10 10:00", account="a")
    data.refund_request("R-unknown", "2026-05-10 10:00", account="ghost")
    data.write_url(db_url)
    close(db_url, "2026-05")
    assert not [r for r in ledger(db_url, "2026-05") if r["kind"] == "refund"]
    engine = create_engine(db_url)
    try:
        from sqlalchemy import select

        from billing_jobs.db.billing_tables import credit_refunds

        with engine.connect() as conn:
            rows = conn.execute(
                select(
                    credit_refunds.c.request_id, credit_refunds.c.credit_units, credit_refunds.c.money_cents
                )
            ).all()
    finally:
        engine.dispose()
    assert [tuple(r) for r in rows] == [("R14", 0, 0)]
    assert ("refund_requests", "R-unknown", "unknown_account") in reject_reasons(db_url)


def test_c15_days_are_billing_days_in_the_billing_timezone(db_url: str, tmp_path: Path) -> None:
    config = tmp_path / "ny.toml"
    config.write_text('[billing]\ntimezone = "America/New_York"\n')
    data = SourceData()
    data.project("p1", created="2025-11-02", account="a")
    data.top_up("T", "2026-11-02 03:00", "online", account="a", credits="100", amount="10.00")
    data.compute("p1", "2026-11-01 04:30", "2")  # 00:30 EDT
    data.compute("p1", "2026-11-02 04:30", "3")  # 23:30 EST, still Nov 1 (25-hour day)
    data.write_url(db_url)
    result = run_cli(db_url, "--config", str(config), "month-end", "--month", "2026-11", env=NO_CHUNK_ENV)
    assert result.code == 0, result.stderr
    result = run_cli(db_url, "credits", "export", "--month", "2026-11")
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(r["lot_id"], r["kind"], r["day"]) for r in rows if r["kind"] == "fund"] == [
        ("T", "fund", "2026-11-01")
    ]
    draws = [r for r in rows if r["kind"] == "draw" and r["day"] < "2026-11-30"]  # 11-30: the invoice
    assert [(r["day"], r["credits"]) for r in draws] == [("2026-11-01", "5")]


def test_a_repeated_month_end_writes_no_entry_and_a_dry_run_writes_nothing(db_url: str) -> None:
    _c6(SourceData()).write_url(db_url)
    assert run_cli(db_url, "db", "upgrade").code == 0
    preview = run_cli(db_url, "month-end", "--month", "2026-05", "--dry-run")
    assert preview.code == 0
    assert "credits ledger (would write)" in preview.stdout
    assert ledger(db_url, "2026-05") == []
    close(db_url, "2026-05")
    first = ledger(db_url, "2026-05")
    close(db_url, "2026-05")
    assert ledger(db_url, "2026-05") == first


def test_late_usage_in_a_written_period_is_a_correction_in_the_closing_month(db_url: str) -> None:
    data = _c6(SourceData())
    data.write_url(db_url)
    close(db_url, "2026-05")
    SourceData().compute("p1", "2026-05-16 12:00", "7").write_url(db_url)
    close(db_url, "2026-06")
    june = ledger(db_url, "2026-06")
    corrections = [r for r in june if r["corrects"] == "2026-05"]
    assert [(r["lot_id"], r["kind"], r["day"], r["credits"]) for r in corrections] == [
        ("A", "draw", "2026-05-16", "7")
    ]
    # every period's entries summed equal a fresh computation on the data as it is now
    both = sums(ledger(db_url, "2026-05") + june)
    assert both[("a", "A", "draw", "2026-05-16")] == Decimal(7)


def test_written_refunds_stay_as_written_when_late_usage_arrives(db_url: str) -> None:
    data = SourceData()
    data.project("p1", created="2025-11-02", account="a")
    data.top_up("A", "2026-05-01 10:00", "online", account="a", credits="1000", amount="95.00")
    data.compute("p1", "2026-05-15 12:00", "400")
    data.refund_request("R1", "2026-05-20 10:00", account="a")
    data.write_url(db_url)
    close(db_url, "2026-05")
    SourceData().compute("p1", "2026-05-16 12:00", "100").write_url(db_url)
    close(db_url, "2026-06")
    rows = ledger(db_url, "2026-05") + ledger(db_url, "2026-06")
    money = [r["money"] for r in rows if r["kind"] == "refund" and r["money"] not in ("", "0.00")]
    assert money == ["57.00"]
    total = sums(rows)
    assert sum(v for k, v in total.items() if k[2] == "refund") == Decimal(500)
    # what the refunded lot lacked of the written 600 credits: the late 100
    assert total[("a", "", "arrears", "2026-05-20")] == Decimal(100)


def test_codes_load_into_redemption_codes_and_redeem(db_url: str, tmp_path: Path) -> None:
    SourceData().account("a").write_url(db_url)
    out = tmp_path / "codes.csv"
    result = run_cli(
        db_url,
        "credits",
        "codes",
        "--batch",
        "launch",
        "--count",
        "20",
        "--credits",
        "25",
        "--redeem-by",
        "2026-06-01",
        "--valid-days",
        "30",
        "--output",
        str(out),
    )
    assert result.code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 20
    assert all(is_valid(r["code"]) for r in rows)
    engine = create_engine(db_url)
    try:
        source_metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(
                insert(redemption_codes),
                [
                    {
                        "code": r["code"],
                        "batch_id": r["batch_id"],
                        "credits": Decimal(r["credits"]),
                        "redeem_by": datetime.fromisoformat(r["redeem_by"]),
                        "valid_days": int(r["valid_days"]),
                    }
                    for r in rows
                ],
            )
    finally:
        engine.dispose()
    again = run_cli(
        db_url,
        "credits",
        "codes",
        "--batch",
        "launch",
        "--count",
        "1",
        "--credits",
        "25",
        "--redeem-by",
        "2026-06-01",
        "--valid-days",
        "30",
    )
    assert again.code == 2
    assert "already has this batch" in again.stderr
    SourceData().top_up(
        "redeem", "2026-05-03 10:00", "code", account="a", code=rows[0]["code"], known=False
    ).write_url(db_url)
    close(db_url, "2026-05")
    funds = [(r["lot_id"], r["credits"]) for r in ledger(db_url, "2026-05") if r["kind"] == "fund"]
    assert funds == [("redeem", "25")]


def _codes(n: int) -> Iterator[str]:
    from billing_jobs.rules.codes import new_codes

    yield from new_codes(n)


def test_100k_codes_are_unique_and_no_two_differ_by_one_character() -> None:
    codes = [c.replace("-", "") for c in _codes(100_000)]
    assert len(set(codes)) == len(codes)
    assert all(set(c) <= set(ALPHABET) for c in codes[:1000])
    # Two codes that differ in one position would be equal with that position masked.
    for position in range(len(codes[0])):
        masked = {c[:position] + c[position + 1 :] for c in codes}
        assert len(masked) == len(codes), f"two codes differ only at position {position}"


def test_the_check_character_catches_every_single_substitution() -> None:
    code = next(_codes(1)).replace("-", "")
    for i in range(len(code)):
        for other in ALPHABET:
            if other != code[i]:
                assert not is_valid(code[:i] + other + code[i + 1 :])


def _last_counts(db_url: str) -> dict[str, int]:
    from sqlalchemy import select

    from billing_jobs.db.billing_tables import billing_runs

    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            text = conn.execute(
                select(billing_runs.c.counts).order_by(billing_runs.c.started_at.desc()).limit(1)
            ).scalar_one()
    finally:
        engine.dispose()
    counts: dict[str, int] = json.loads(text)
    return counts


def test_a_month_end_continues_each_account_from_its_written_state_unless_late_data_touches_it(
    db_url: str,
) -> None:
    data = SourceData()
    for account in ("a", "b", "c"):
        data.project(f"p-{account}", created="2025-11-02", account=account)
        data.top_up(f"t-{account}", "2026-05-01 10:00", account=account, credits="1000", amount="95.00")
        data.compute(f"p-{account}", "2026-05-10 12:00", "12")
    data.write_url(db_url)
    close(db_url, "2026-05")
    assert _last_counts(db_url)["accounts_replayed_whole"] == 3  # nothing written before: all
    close(db_url, "2026-06")
    assert _last_counts(db_url)["accounts_replayed_whole"] == 0
    SourceData().compute("p-b", "2026-05-11 12:00", "3").write_url(db_url)  # late usage of May
    close(db_url, "2026-07")
    counts = _last_counts(db_url)
    assert counts["accounts_replayed_whole"] == 1
    assert counts["ledger_corrections"] == 1
    july = ledger(db_url, "2026-07")
    assert [
        (r["account_id"], r["kind"], r["day"], r["corrects"], r["credits"]) for r in july if r["corrects"]
    ] == [("b", "draw", "2026-05-11", "2026-05", "3")]


def _nonzero(rows: list[dict[str, str]]) -> dict[tuple[str, str, str, str], Decimal]:
    """`sums` without the keys a correction brought to zero."""
    return {key: value for key, value in sums(rows).items() if value}


def _four_accounts(data: SourceData) -> SourceData:
    for account in "abcd":
        data.project(f"p-{account}", created="2025-11-02", account=account)
        data.top_up(f"t-{account}", "2026-05-01 10:00", account=account, credits="1000", amount="95.00")
        data.compute(f"p-{account}", "2026-05-10 12:00", "12", usage_id=f"u-{account}")
    return data


def _late_in_may(data: SourceData) -> SourceData:
    data.compute("p-b", "2026-05-11 12:00", "3", usage_id="late-b")  # compute
    data.refund_request("R-c", "2026-05-20 10:00", account="c")  # a refund request
    data.top_up("t-d2", "2026-05-15 10:00", account="d", credits="100", amount="10.00", known=False)
    return data


def test_a_re_close_replays_only_the_accounts_whose_month_changed(db_url: str, tmp_path: Path) -> None:
    _four_accounts(SourceData()).write_url(db_url)
    close(db_url, "2026-05")
    assert _last_counts(db_url)["accounts_unchanged"] == 0  # nothing written before
    close(db_url, "2026-05")
    counts = _last_counts(db_url)
    assert (counts["accounts_unchanged"], counts["accounts_replayed_whole"], counts["ledger_entries"]) == (
        4,
        0,
        0,
    )
    _late_in_may(SourceData()).write_url(db_url)
    close(db_url, "2026-05")
    counts = _last_counts(db_url)
    assert (counts["accounts_unchanged"], counts["accounts_replayed_whole"]) == (1, 3)
    assert counts["ledger_entries"] > 0
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    _late_in_may(_four_accounts(SourceData())).write_url(fresh)
    close(fresh, "2026-05")
    assert _nonzero(ledger(db_url, "2026-05")) == _nonzero(ledger(fresh, "2026-05"))
    kinds = {(r["account_id"], r["kind"]) for r in ledger(fresh, "2026-05")}
    assert {("b", "draw"), ("c", "refund"), ("d", "fund")} <= kinds
    close(db_url, "2026-05")
    counts = _last_counts(db_url)
    assert (counts["accounts_unchanged"], counts["ledger_entries"]) == (4, 0)
    # A refund written for a request that is gone: c is replayed again, not kept.
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(delete(refund_requests).where(refund_requests.c.request_id == "R-c"))
    finally:
        engine.dispose()
    close(db_url, "2026-05")
    counts = _last_counts(db_url)
    assert (counts["accounts_unchanged"], counts["accounts_replayed_whole"]) == (3, 1)


def _april_and_may(data: SourceData) -> SourceData:
    for account in "ab":
        data.project(f"p-{account}", created="2025-11-02", account=account)
        data.top_up(f"t-{account}", "2026-04-01 10:00", account=account, credits="100", amount="10.00")
        data.compute(f"p-{account}", "2026-04-10 12:00", "60", usage_id=f"apr-{account}")
        data.compute(f"p-{account}", "2026-05-10 12:00", "60", usage_id=f"may-{account}")
    return data


def test_a_re_close_of_an_earlier_month_makes_the_next_re_close_replay_what_it_changed(
    db_url: str, tmp_path: Path
) -> None:
    # b's late April compute changes its state at April's end: May's written entries
    # (a draw of 40 and 20 of arrears) no longer follow, though May's inputs are the same.
    _april_and_may(SourceData()).write_url(db_url)
    close(db_url, "2026-04", "2026-05")
    SourceData().compute("p-b", "2026-04-11 12:00", "30", usage_id="late-b").write_url(db_url)
    close(db_url, "2026-04", "2026-05")
    counts = _last_counts(db_url)
    assert (counts["accounts_unchanged"], counts["ledger_corrections"]) == (1, 2)
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    _april_and_may(SourceData()).compute("p-b", "2026-04-11 12:00", "30", usage_id="late-b").write_url(fresh)
    close(fresh, "2026-04", "2026-05")
    mine = _nonzero(ledger(db_url, "2026-04") + ledger(db_url, "2026-05"))
    assert mine == _nonzero(ledger(fresh, "2026-04") + ledger(fresh, "2026-05"))
    assert mine[("b", "", "arrears", "2026-05-10")] == Decimal(50)


def test_a_re_close_replays_an_account_whose_restore_lot_another_validity_would_change(
    db_url: str, tmp_path: Path
) -> None:
    data = SourceData().project("p-a", created="2025-11-02", account="a").account("a")
    data.compute("p-a", "2026-05-10 12:00", "-5")  # given back with no lot to restore: a new lot
    data.write_url(db_url)
    close(db_url, "2026-05")
    assert ("a", "expire") not in {(r["account_id"], r["kind"]) for r in ledger(db_url, "2026-05")}
    config = tmp_path / "billing.toml"
    config.write_text("[top_up]\nvalidity_days = 5\n", "utf-8")
    env = {**NO_CHUNK_ENV, "BILLING_CONFIG": str(config)}
    result = run_cli(db_url, "month-end", "--month", "2026-05", "--reprice", env=env)
    assert result.code == 0, result.stderr
    counts = _last_counts(db_url)
    assert (counts["accounts_unchanged"], counts["accounts_replayed_whole"]) == (0, 1)
    assert sums(ledger(db_url, "2026-05"))[("a", "restore-a-2026-05-10", "expire", "2026-05-14")] == Decimal(
        5
    )


def test_history_balance_and_report_show_the_same_numbers_as_the_export(db_url: str, tmp_path: Path) -> None:
    data = _c6(SourceData())
    data.compute("p1", "2026-05-20 12:00", "-5")
    data.refund_request("R1", "2026-06-05 10:00", account="a")
    data.top_up("late-june", "2026-06-10 10:00", account="a", credits="100", amount="10.00", known=False)
    data.write_url(db_url)
    close(db_url, "2026-05")
    may = ledger(db_url, "2026-05")
    history = run_cli(db_url, "credits", "history", "--account", "a", "--month", "2026-05", "--csv")
    assert history.code == 0, history.stderr
    rows = list(csv.DictReader(io.StringIO(history.stdout)))
    assert all(r["source"] == "ledger" for r in rows)
    by_day: dict[tuple[str, str, str], Decimal] = {}
    for r in rows:
        key = (r["lot_id"], r["kind"], r["day"])
        by_day[key] = by_day.get(key, Decimal(0)) + Decimal(r["credits"])
    assert by_day == {(lot, kind, day): v for (_, lot, kind, day), v in sums(may).items()}

    # June is not written yet: the balance of June 30 is a preview from the source data.
    june = balance(db_url, "a", "2026-06-30")
    assert june["written_through"] == "2026-05-31"
    held = {lot["lot_id"]: lot["held"] for lot in june["lots"]}  # type: ignore[union-attr]
    assert held["A"] == "0"  # refunded on June 5
    assert held["late-june"] == "100"
    close(db_url, "2026-06")  # June's invoice (29 credits of storage fee) is drawn on June 30
    closed = {lot["lot_id"]: lot["held"] for lot in balance(db_url, "a", "2026-06-30")["lots"]}  # type: ignore[union-attr]
    assert closed == {**held, "late-june": "71"}

    out = tmp_path / "report.csv"
    result = run_cli(db_url, "credits", "report", "--month", "2026-06", "--output", str(out))
    assert result.code == 0, result.stderr
    report = {r["account_id"]: r for r in csv.DictReader(io.StringIO(out.read_text()))}
    a = {k: Decimal(v) for k, v in report["a"].items() if k != "account_id"}
    moved = (
        a["funded_online"]
        + a["funded_wire"]
        + a["funded_code"]
        + a["funded_restore"]
        + a["restored"]
        - a["drawn_compute"]
        - a["drawn_invoices"]
        - a["repaid"]
        - a["expired"]
        - a["refunded"]
    )
    assert a["closing_credits"] == a["opening_credits"] + moved
    june_rows = ledger(db_url, "2026-06")
    refunded = sum(Decimal(r["money"]) for r in june_rows if r["kind"] == "refund" and r["account_id"] == "a")
    assert a["refunded_money"] == refunded
    assert report["platform"]["closing_credits"] == report["a"]["closing_credits"]


def test_balance_and_history_of_an_unknown_account_exit_2_with_one_line(db_url: str) -> None:
    _c6(SourceData()).write_url(db_url)
    for args in (
        ("balance", "--account", "nobody"),
        ("history", "--account", "nobody", "--month", "2026-05"),
    ):
        result = run_cli(db_url, "credits", *args)
        assert result.code == 2
        assert result.stderr.count("\n") == 1
        assert "nobody" in result.stderr


def test_bad_credits_arguments_exit_2_with_one_line() -> None:
    for args in (
        ("quote", "--credits", "abc"),
        ("quote", "--credits", "100", "--amount", "10"),
        ("quote", "--credits", "100.00001"),
        ("quote", "--amount", "10", "--date", "2026-13-01"),
        ("export", "--month", "2026-5"),
        (
            "codes",
            "--batch",
            "b",
            "--count",
            "0",
            "--credits",
            "5",
            "--redeem-by",
            "2026-06-01",
            "--valid-days",
            "3",
        ),
        (
            "codes",
            "--batch",
            "b",
            "--count",
            "5",
            "--credits",
            "5",
            "--redeem-by",
            "soon",
            "--valid-days",
            "3",
        ),
    ):
        result = run_cli(None, "credits", *args)
        assert result.code == 2, (args, result.stderr)
        assert result.stderr.count("\n") == 1, (args, result.stderr)


def _five_accounts(url: str) -> None:
    data = SourceData()
    for i, account in enumerate(("Acc-1", "acc-2", "_acc 3", "Zed-4", "zed-5")):
        data.project(f"p{i}", created="2025-11-02", account=account)
        data.top_up(f"t{i}", f"2026-05-0{i + 1} 10:00", account=account, credits="1000", amount="95.00")
        data.compute(f"p{i}", "2026-05-15 12:00", str(20 * i + 1))
        data.compute(f"p{i}", "2026-06-15 12:00", str(7 * i + 2))
    data.refund_request("r1", "2026-06-20 10:00", account="acc-2")
    data.write_url(url)


def test_the_ledger_does_not_depend_on_its_chunks_or_workers(db_url: str, tmp_path: Path) -> None:
    _five_accounts(db_url)
    chunked = {"BILLING_LEDGER_ACCOUNTS_PER_CHUNK": "2", "BILLING_WORKERS": "2"}
    close(db_url, "2026-05", "2026-06", env=chunked)
    got = [r for m in ("2026-05", "2026-06") for r in ledger(db_url, m)]
    other = f"sqlite:///{tmp_path / 'one-chunk.db'}"
    _five_accounts(other)
    close(other, "2026-05", "2026-06")
    assert got == [r for m in ("2026-05", "2026-06") for r in ledger(other, m)]
    assert any(r["kind"] == "refund" for r in got)


def test_a_month_end_logs_each_ledger_chunk_with_where_its_time_went(db_url: str) -> None:
    """At DEBUG, one `ledger.chunk` line per chunk of accounts, with its phases in seconds
    (what ops and the benchmark read to see where a ledger's time goes)."""
    data = _c6(SourceData()).project("q1", created="2025-11-02", account="b")
    data.top_up("Q", "2026-05-02 10:00", "online", account="b", credits="1000", amount="95.00")
    data.compute("q1", "2026-05-15 12:00", "5").compute("q1", "2026-06-03 12:00", "5").write_url(db_url)
    close(db_url, "2026-05")
    SourceData().compute("p1", "2026-05-16 12:00", "7").write_url(db_url)
    result = run_cli(
        db_url,
        "--log-level",
        "DEBUG",
        "month-end",
        "--month",
        "2026-06",
        env={**NO_CHUNK_ENV, "BILLING_LEDGER_ACCOUNTS_PER_CHUNK": "1"},
    )
    assert result.code == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    chunks = [e for e in events if e["event"] == "ledger.chunk"]
    assert [c["accounts"] for c in chunks] == [1, 1]
    reopened = [c for c in chunks if c["replayed_whole"]]
    assert len(reopened) == 1, "the late usage reopens its account only"
    for phase in ("read", "compute_read", "history_check", "history_read", "replay", "diff", "write"):
        assert reopened[0][f"{phase}_seconds"] >= 0
    assert all(c["seconds"] >= c["read_seconds"] for c in chunks)
    assert "history_read_seconds" not in {k for c in chunks if not c["replayed_whole"] for k in c}


KINDS = ("fund", "draw", "restore", "repay", "expire", "refund", "arrears")
TWO_WORKERS = {"BILLING_WORKERS": "2", "BILLING_LEDGER_ACCOUNTS_PER_CHUNK": "1"}


def _printed_by_kind(stdout: str) -> dict[str, tuple[int, str]]:
    """The month-end's table of ledger entries: kind -> (entries, credits)."""
    out: dict[str, tuple[int, str]] = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.replace("│", "|").split("|") if c.strip()]
        if len(cells) >= 4 and cells[0] in KINDS:
            out[cells[0]] = (int(cells[1]), cells[3])
    return out


@pytest.mark.parametrize("env", [NO_CHUNK_ENV, TWO_WORKERS])
def test_the_entries_a_close_prints_per_kind_are_those_it_wrote(db_url: str, env: dict[str, str]) -> None:
    """The chunks send back their entries summed per kind (not the entries): the table a
    close prints counts and sums what `credits export` then shows, with one chunk per
    account on two workers as with one chunk."""
    data = _c6(SourceData())
    data.project("p2", created="2025-11-02", account="b")
    data.top_up("D", "2026-05-02 10:00", "online", account="b", credits="100", amount="10.00")
    data.compute("p2", "2026-05-20 12:00", "130.5")
    data.write_url(db_url)
    result = run_cli(db_url, "month-end", "--month", "2026-05", env=env)
    assert result.code == 0, result.stderr
    printed = _printed_by_kind(result.stdout)
    exported: dict[str, list[Decimal]] = {}
    for r in ledger(db_url, "2026-05"):
        exported.setdefault(r["kind"], []).append(Decimal(r["credits"]))
    assert {k: len(v) for k, v in exported.items()} == {k: n for k, (n, _) in printed.items()}
    assert {k: Decimal(c.replace(",", "")) for k, (_, c) in printed.items()} == {
        k: sum(v, Decimal(0)) for k, v in exported.items()
    }
    assert "arrears" in printed  # b draws 100 of 130.5: arrears of 30.5
    assert "draw" in printed
