"""Finance and support pages: `report` (the month, one HTML file) and `statement` (one
account's month as HTML, CSV or PDF).

Thin: `jobs.report` and `jobs.statement` read, `pages` renders; this module parses and
writes. Files are written whole (a `.partial` renamed at the end).
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from billing_jobs.commands.common import Context
from billing_jobs.rules.calendar import Month


def _month(value: str) -> Month:
    try:
        return Month.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--month") from None


def _write(text: str, output: str | None) -> None:
    if not output:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    tmp = Path(output).with_name(Path(output).name + ".partial")
    tmp.write_text(text, encoding="utf-8", newline="")
    os.replace(tmp, output)


def _output_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--output", type=click.Path(dir_okay=False, writable=True), default=None, help=help_text
    )


_month_option = click.option(
    "--month", "month_text", required=True, metavar="YYYY-MM", help="A closed billing month."
)


@click.command("report")
@_month_option
@_output_option("The HTML file to write (default: stdout).")
@click.pass_obj
def report(ctx: Context, month_text: str, output: str | None) -> None:
    """The month for finance, as one self-contained HTML file (no network needed to view).

    Totals by line type; projects charged, let off by the free first month and the
    legacy month, and refunded by the active-project waiver, with the credits each
    cost; the credits roll-forward; rejected rows by reason; the last 12 closed months
    as charts; the top accounts; and the runs that produced the month.

    Example: billing-jobs report --month 2026-10 --output report-2026-10.html
    """
    from billing_jobs.jobs.report import NothingToReport, build_report
    from billing_jobs.pages import render_report

    month = _month(month_text)
    try:
        found = build_report(ctx.engine, ctx.settings, month)
    except NothingToReport as exc:
        raise click.UsageError(str(exc)) from None
    _write(render_report(found), output)
    if output:
        click.echo(f"report {month} written to {output}", err=True)


@click.command("statement")
@click.option("--account", "account_id", required=True, metavar="ID", help="The account.")
@_month_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["html", "csv", "pdf"]),
    default="html",
    show_default=True,
    help="HTML page, CSV of the invoiced lines with a total, or PDF (printed by headless Chromium).",
)
@_output_option("The file to write (default: stdout; required for pdf).")
@click.pass_obj
def statement(ctx: Context, account_id: str, month_text: str, fmt: str, output: str | None) -> None:
    """One account's month for the customer: each project, days charged and not and why,
    waiver refunds, cloud fees, the total, and the account's credits (opening, top-ups,
    draws, closing). The same figures as `export`, `explain` and the credits ledger.

    Example: billing-jobs statement --account acct-0001 --month 2026-10 --format pdf --output s.pdf
    """
    from billing_jobs.jobs.statement import NotInvoiced, UnknownAccount, build_statement, csv_rows
    from billing_jobs.pages import NoBrowser, find_chromium, print_pdf, render_statement

    month = _month(month_text)
    if fmt == "pdf":
        if not output:
            raise click.UsageError("--format pdf needs --output FILE")
        if find_chromium() is None:
            raise click.UsageError(
                "--format pdf needs headless Chromium (`apt-get install chromium`) on PATH"
            )
    try:
        found = build_statement(ctx.engine, ctx.settings, account_id, month)
    except (UnknownAccount, NotInvoiced) as exc:
        raise click.UsageError(str(exc)) from None
    if fmt == "csv":
        from io import StringIO

        from billing_jobs.jobs.statement import CSV_HEADER

        buf = StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(CSV_HEADER)
        writer.writerows(csv_rows(found))
        _write(buf.getvalue(), output)
        return
    html = render_statement(found)
    if fmt == "html":
        _write(html, output)
        return
    assert output is not None
    try:
        print_pdf(html, Path(output))
    except NoBrowser as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"statement {account_id} {month} written to {output}", err=True)


COMMANDS: list[click.Command] = [report, statement]
