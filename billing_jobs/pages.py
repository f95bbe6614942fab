"""HTML pages for finance and support: the month report and an account's statement.

Jinja2 templates (autoescape on) in `billing_jobs/templates`; one self-contained file
each: styles inline, charts inline SVG, no scripts, fonts, images or links to fetch
(a Content-Security-Policy of `default-src 'none'` says so to the browser too).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from billing_jobs.frames import pd
from billing_jobs.jobs.report import MonthReport
from billing_jobs.jobs.statement import NOT_ACTIVE, STATUS_WORDS, Statement
from billing_jobs.rules.invoice import LINE_ORDER, STORAGE_FEE, STORAGE_REFUND
from billing_jobs.rules.money import format_cents, format_units

CREDIT_ROWS = [
    ("opening", "opening_credits"),
    ("funded online", "funded_online"),
    ("funded by wire", "funded_wire"),
    ("funded by codes", "funded_code"),
    ("funded by restores", "funded_restore"),
    ("drawn for compute", "drawn_compute"),
    ("drawn for invoices", "drawn_invoices"),
    ("restored", "restored"),
    ("repaid (arrears)", "repaid"),
    ("expired", "expired"),
    ("refunded", "refunded"),
    ("closing", "closing_credits"),
    ("arrears at opening", "opening_arrears"),
    ("arrears change", "arrears_change"),
    ("arrears at closing", "closing_arrears"),
]
MONEY_ROWS = [
    ("funded (paid)", "funded_money"),
    ("refunded (paid out)", "refunded_money"),
    ("opening credits at cost", "opening_money_at_cost"),
    ("drawn at cost", "drawn_money_at_cost"),
    ("expired at cost", "expired_money_at_cost"),
    ("closing credits at cost", "closing_money_at_cost"),
]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def _grouped(text: str) -> str:
    sign = "-" if text.startswith("-") else ""
    whole, _, part = text.lstrip("-").partition(".")
    return sign + f"{int(whole):,}" + (f".{part}" if part else "")


def _credits(units: Any) -> str:
    return _grouped(format_units(int(units)))


def _cents(cents: Any) -> str:
    return _grouped(format_cents(int(cents)))


def _count(n: Any) -> str:
    return f"{int(n):,}"


def _when(value: Any) -> str:
    if value is None or (not isinstance(value, datetime) and pd.isna(value)):
        return ""
    ts = pd.Timestamp(value)
    return f"{ts:%Y-%m-%d %H:%M:%S}"


def environment() -> Environment:
    env = Environment(
        loader=PackageLoader("billing_jobs", "templates"),
        autoescape=select_autoescape(["html", "j2"], default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(credits=_credits, cents=_cents, count=_count, when=_when)
    return env


def report_charts(r: MonthReport) -> list[str]:
    from billing_jobs import charts

    h = r.history
    periods = list(h["period"])
    fees = {t: list(h[t]) for t in LINE_ORDER if t != STORAGE_REFUND and h[t].any()} or {
        STORAGE_FEE: list(h[STORAGE_FEE])
    }
    return [
        charts.stacked_bars("Fees by line type", periods, fees),
        charts.stacked_bars("Active-project waiver refunds", periods, {"refunds": list(h["waiver_refunds"])}),
        charts.stacked_bars(
            "Rejected source rows", periods, {"rows": list(h["rejects"])}, units=False, ylabel="rows"
        ),
        charts.grouped_bars(
            "Credits funded and drawn", periods, {"funded": list(h["funded"]), "drawn": list(h["drawn"])}
        ),
    ]


def render_report(r: MonthReport) -> str:
    return (
        environment()
        .get_template("report.html.j2")
        .render(
            r=r,
            charts=[Markup(svg) for svg in report_charts(r)],
            credit_rows=CREDIT_ROWS,
            money_rows=MONEY_ROWS,
            funded=sum(r.credits[k] for k in ("funded_online", "funded_wire", "funded_code")),
            reject_total=int(r.rejects["rows"].sum()) if len(r.rejects) else 0,
        )
    )


def render_statement(s: Statement) -> str:
    template = environment().get_template("statement.html.j2")
    return template.render(s=s, words=STATUS_WORDS, not_active=NOT_ACTIVE)


class NoBrowser(RuntimeError):
    """No headless Chromium to print a PDF with."""


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def print_pdf(html: str, output: Path, *, timeout: float = 120) -> None:
    """Print `html` to `output` with headless Chromium (no network: every host unresolvable)."""
    browser = find_chromium()
    if browser is None:
        raise NoBrowser(
            "PDF needs headless Chromium (`apt-get install chromium`); none of "
            + ", ".join(CHROMIUM_NAMES)
            + " is on PATH"
        )
    with tempfile.TemporaryDirectory(prefix="billing-pdf-") as tmp:
        page = Path(tmp) / "statement.html"
        page.write_text(html, encoding="utf-8")
        subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-pdf-header-footer",
                f"--user-data-dir={tmp}/profile",
                "--host-resolver-rules=MAP * ~NOTFOUND",
                f"--print-to-pdf={output}",
                page.as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
    if not output.exists() or output.stat().st_size == 0:
        raise RuntimeError(f"Chromium wrote no PDF to {output}")
