"""`report` and `statement` on SQLite and PostgreSQL: every figure they show adds up to the
exports (`export`, `credits export`) and the rules' worked numbers."""

from __future__ import annotations

import csv
import io
import re
from decimal import Decimal
from pathlib import Path

from support import SourceData, export_rows, lines_by, run_cli

from billing_jobs.rules.money import UNITS_PER_CREDIT

ONE_PROCESS = {"BILLING_WORKERS": "1"}


def _scenario(db_url: str) -> None:
    data = SourceData()
    # Legacy projects (created before the fee started on 2026-03-24): April is their legacy
    # month until 04-23, then 7 charged days; May is charged up to the cap (29 of 31 days).
    data.project("p-charged", created="2025-11-02", account="acct-1")
    data.project("p-waived", created="2025-11-02", account="acct-1")
    data.compute("p-waived", "2026-05-03 10:00", "0.1", count=300)  # 30 credits: May refunded
    # New projects: p-new free from 05-10 to 06-09 (May: 22 free days), p-other from 04-20
    # to 05-19 (April: 11 free days; May: 19 free, 12 charged).
    data.project("p-new", created="2026-05-10 12:00", account="acct-1")
    data.project("p-other", created="2026-04-20 08:00", account="acct-2")
    data.top_up("T1", "2026-05-03 10:00", "online", account="acct-2", credits="1000", amount="95.00")
    data.compute("p-other", "2026-05-04 10:00", None)  # rejected: missing amount
    data.write_url(db_url)
    for month in ("2026-04", "2026-05"):
        result = run_cli(db_url, "month-end", "--month", month, env=ONE_PROCESS)
        assert result.code == 0, result.stderr


def _units(html: str, attribute: str, value: str) -> Decimal:
    """The `data-units` of the row whose `attribute` is `value`, as credits."""
    found = re.search(rf'<tr {attribute}="{re.escape(value)}"[^>]*>.*?data-units="(-?\d+)"', html, re.S)
    assert found, f"no {attribute}={value} row"
    return Decimal(found.group(1)) / UNITS_PER_CREDIT


def _report(db_url: str, month: str, tmp_path: Path) -> str:
    out = tmp_path / f"report-{month}.html"
    result = run_cli(db_url, "report", "--month", month, "--output", str(out))
    assert result.code == 0, result.stderr
    return out.read_text(encoding="utf-8")


def _credits_export(db_url: str, month: str) -> list[dict[str, str]]:
    result = run_cli(db_url, "credits", "export", "--month", month)
    assert result.code == 0, result.stderr
    return list(csv.DictReader(io.StringIO(result.stdout)))


def test_report_adds_up_to_the_exports(db_url: str, tmp_path: Path) -> None:
    _scenario(db_url)
    html = _report(db_url, "2026-05", tmp_path)

    rows = export_rows(db_url, "2026-05")
    by_type = lines_by(rows, "line_type")
    assert by_type == {("storage_fee",): Decimal(70), ("storage_refund",): Decimal(-29)}
    for (line_type,), amount in by_type.items():
        assert _units(html, "data-line-type", line_type) == amount
    total = re.search(r'<tr class="total"><td>total</td>.*?data-units="(-?\d+)"', html, re.S)
    assert total
    assert Decimal(total.group(1)) / UNITS_PER_CREDIT == sum(by_type.values()) == 41

    assert _units(html, "data-promotion", "charged the storage fee") == 70  # 29 + 29 + p-other 12
    assert _units(html, "data-promotion", "refunded by the active-project waiver") == 29
    # p-new: 22 free days at 1/day. p-other: free until 05-19, charged 12 from 05-20; without
    # the promotion its 31 days would have cost the cap, 29: the promotion cost 29 - 12 = 17.
    assert _units(html, "data-promotion", "free first month") == 22 + 17
    assert _units(html, "data-promotion", "legacy free month") == 0

    ledger = _credits_export(db_url, "2026-05")
    funded = sum(Decimal(r["credits"]) for r in ledger if r["kind"] == "fund")
    drawn = sum(Decimal(r["credits"]) for r in ledger if r["kind"] == "draw")
    assert funded == 1000
    channels = ("funded_online", "funded_wire", "funded_code", "funded_restore")
    assert sum(_units(html, "data-key", k) for k in channels) == funded
    assert _units(html, "data-key", "drawn_compute") + _units(html, "data-key", "drawn_invoices") == drawn
    assert drawn > 0

    assert re.search(r"<td>compute_usage</td><td>missing_amount</td><td class=\"n\">1</td>", html)
    assert "The last 2 closed month(s)" in html
    assert html.count("<svg") == 4
    for tag in ("<script", "<link", "<img", "<iframe", "@import", "src="):
        assert tag not in html, tag
    # References stay inside the page: SVG's own `href="#..."` and `url(#...)`.
    assert re.findall(r'href="([^#][^"]*)"', html) == []
    assert re.findall(r"url\((?!#)([^)]*)\)", html) == []
    # The only addresses are the SVG and XLink namespace names, which are never fetched.
    assert set(re.findall(r"https?://[^\"'\s)]+", html)) == {
        "http://www.w3.org/2000/svg",
        "http://www.w3.org/1999/xlink",
    }


def test_report_of_the_legacy_month_and_its_runs(db_url: str, tmp_path: Path) -> None:
    _scenario(db_url)
    html = _report(db_url, "2026-04", tmp_path)
    # Both legacy projects of acct-1: 23 free days each, 22 credits each (cap 29 - 7 charged).
    assert _units(html, "data-promotion", "legacy free month") == 44
    assert re.search(r'data-promotion="legacy free month"><td>[^<]*</td><td class="n">2</td>', html)
    # p-other (created 04-20, new): free for the rest of April.
    assert _units(html, "data-promotion", "free first month") == 11
    assert "The last 1 closed month(s)" in html  # 2026-05 comes after the month reported
    assert "<td>month-end</td><td>succeeded</td>" in html
    assert re.search(r'<p id="settings">Billed with the settings <code>[0-9a-f]{8,}</code>.\s*</p>', html)

    # With other promotions in force now, the report says so (its free-month figures follow them).
    settings = tmp_path / "billing.toml"
    settings.write_text("[promotions]\nlegacy_free_months = 0\n")
    out = tmp_path / "other.html"
    result = run_cli(db_url, "--config", str(settings), "report", "--month", "2026-04", "--output", str(out))
    assert result.code == 0, result.stderr
    other = out.read_text(encoding="utf-8")
    assert "<code>legacy_free_months: &#39;1&#39; -&gt; &#39;0&#39;</code>" in other
    assert _units(other, "data-promotion", "legacy free month") == 0


def test_statement_total_equals_the_export(db_url: str, tmp_path: Path) -> None:
    _scenario(db_url)
    rows = export_rows(db_url, "2026-05")
    expected = lines_by(rows, "account_id")[("acct-1",)]

    result = run_cli(db_url, "statement", "--account", "acct-1", "--month", "2026-05")
    assert result.code == 0, result.stderr
    total = re.search(r'id="statement-total" data-units="(-?\d+)"', result.stdout)
    assert total
    assert Decimal(total.group(1)) / UNITS_PER_CREDIT == expected == 29
    assert "22 × free: first month of a new project" in result.stdout
    assert "2 × free: monthly cap reached" in result.stdout
    assert "compute 30 ≥ 30 credits: storage fee 29 refunded" in result.stdout
    # The statement names the numbers finalization gave the account's invoices (as the export).
    numbers = sorted({r["invoice_number"] for r in rows if r["account_id"] == "acct-1"})
    assert numbers
    assert re.findall(r'<code class="invoice-number">([^<]+)</code>', result.stdout) == numbers

    result = run_cli(db_url, "statement", "--account", "acct-1", "--month", "2026-05", "--format", "csv")
    assert result.code == 0, result.stderr
    lines = list(csv.DictReader(io.StringIO(result.stdout)))
    assert lines[-1]["line_type"] == "total"
    assert Decimal(lines[-1]["amount"]) == expected
    assert sum(Decimal(r["amount"]) for r in lines[:-1]) == expected
    assert {(r["project_id"], r["line_type"], r["amount"]) for r in lines[:-1]} == {
        (r["project_id"], r["line_type"], r["amount"]) for r in rows if r["account_id"] == "acct-1"
    } | {("p-new", "", "0")}

    # acct-2's credits: funded 1000 in May, the opening of the month 0.
    out = tmp_path / "acct-2.html"
    result = run_cli(db_url, "statement", "--account", "acct-2", "--month", "2026-05", "--output", str(out))
    assert result.code == 0, result.stderr
    page = out.read_text(encoding="utf-8")
    assert re.search(r"<td>top-ups and codes</td><td class=\"n\">1,000</td>", page)
    assert re.search(r"<td>opening</td><td class=\"n\">0</td>", page)


BAD_ARGUMENTS = [
    (["report", "--month", "2026-06"], "month 2026-06 is not closed"),
    (["report", "--month", "2026-13"], "--month"),
    (["statement", "--account", "nobody", "--month", "2026-05"], "unknown account 'nobody'"),
    (["statement", "--account", "acct-1", "--month", "2026-06"], "month 2026-06 is not closed"),
    (["statement", "--account", "acct-1", "--month", "2026-05", "--format", "pdf"], "needs --output"),
]


def test_bad_arguments_exit_2_with_one_line(db_url: str) -> None:
    _scenario(db_url)
    for args, message in BAD_ARGUMENTS:
        result = run_cli(db_url, *args)
        assert result.code == 2, (args, result.stderr)
        assert message in result.stderr, args
        assert len(result.stderr.strip().splitlines()) == 1, args
