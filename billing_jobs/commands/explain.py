"""Support: `explain`, one project's billing month day by day.

Thin: `jobs.explain` computes (with the invoices' own pipeline); this module
parses and prints.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

import click

from billing_jobs.commands.common import Context, utcnow, yesterday_in
from billing_jobs.rules.calendar import Month
from billing_jobs.rules.money import format_units

if TYPE_CHECKING:  # the computing modules (pandas) are imported when the command runs
    from rich.console import Console
    from rich.table import Table

    from billing_jobs.jobs import explain as ex


def _console() -> Console:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 160)


@click.command("explain")
@click.option("--project", "project_id", required=True, metavar="ID", help="The project to explain.")
@click.option("--month", "month_text", required=True, metavar="YYYY-MM", help="The billing month.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document, for scripts.")
@click.pass_obj
def explain(ctx: Context, project_id: str, month_text: str, as_json: bool) -> None:
    """Explain one project's month: each day, each fee, and the invoice lines.

    For every day: active or not and why (created, archived, restored, deleted,
    rejected events), free (which promotion) or charged and how much, cap
    reached, published, cloud fees. Then the compute total against the waiver
    threshold, the totals the invoice lines must equal, and the invoice lines
    actually written, with a note when they differ.

    Example: billing-jobs explain --project prj-42 --month 2026-05
    """
    from billing_jobs.jobs import explain as ex

    try:
        month = Month.parse(month_text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--month") from None
    try:
        # A month in progress is explained through yesterday, as its preview is.
        through = yesterday_in(ctx.settings, utcnow())
        found = ex.explain_project(ctx.engine, ctx.settings, project_id, month, through=through)
    except ex.UnknownProject as exc:
        raise click.UsageError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(ex.to_record(found), indent=2))
        return
    _print(found)


def _print(x: ex.Explanation) -> None:
    from rich.table import Table

    console = _console()
    console.print(
        f"project {x.project_id} (account {x.account_id}), month {x.month}, "
        f"billing timezone {x.timezone}; created {x.created_at:%Y-%m-%d %H:%M} UTC"
    )
    days = Table(title="days", title_justify="left")
    for name, justify in (
        ("day", "left"),
        ("active", "left"),
        ("why", "left"),
        ("storage fee", "left"),
        ("amount", "right"),
        ("published", "left"),
        ("cloud fees", "left"),
    ):
        days.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for d in x.days:
        cloud = ", ".join(
            f"{c.metric} {format_units(c.quantity_units)} = {format_units(c.amount_units)}" for c in d.cloud
        )
        days.add_row(
            f"{d.day} {d.day:%a}",
            "yes" if d.active else "no",
            d.why,
            _storage_words(d),
            format_units(d.storage_units) if d.active else "",
            "yes" if d.published else "",
            cloud,
        )
    console.print(days)

    _print_month(console, x)
    _print_lines(console, x)
    for note in x.notes:
        console.print(f"note: {note}")


def _print_month(console: Console, x: ex.Explanation) -> None:
    active = sum(d.active for d in x.days)
    charged = [d for d in x.days if d.charged]
    capped = sum(d.cap_reached for d in x.days)
    free = sum(d.free is not None for d in x.days)
    console.print(
        f"storage fee: {len(charged)} day(s) charged, {format_units(sum(d.storage_units for d in x.days))} "
        f"credits ({active} active day(s): {free} free, {capped} after the cap)"
    )
    console.print(f"waiver: {x.waiver.why}")
    if len(x.rejected_rows):
        console.print("rejected source rows:")
        for r in x.rejected_rows.itertuples(index=False):
            console.print(f"  {r.source_table} {r.source_id}: {r.reason} ({r.detail})")


def _table(title: str, columns: list[tuple[str, str]]) -> Table:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for name, justify in columns:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    return table


def _print_lines(console: Console, x: ex.Explanation) -> None:
    if x.totals:
        totals = _table(
            "recomputed lines (what the invoices must sum to)",
            [("line_type", "left"), ("quantity", "right"), ("unit_price", "right"), ("amount", "right")],
        )
        for t in x.totals:
            totals.add_row(
                t.line_type, format_units(t.quantity_units), t.unit_price, format_units(t.amount_units)
            )
        console.print(totals)
    else:
        console.print("recomputed lines: none (nothing to invoice)")
    if not x.invoiced:
        console.print("invoice lines written: none")
        return
    written = _table(
        "invoice lines written",
        [
            ("invoice", "left"),
            ("kind", "left"),
            ("status", "left"),
            ("line_type", "left"),
            ("quantity", "right"),
            ("amount", "right"),
        ],
    )
    for i in x.invoiced:
        written.add_row(
            i.invoice_id,
            i.invoice_kind,
            i.status,
            i.line_type,
            format_units(i.quantity_units),
            format_units(i.amount_units),
        )
    console.print(written)


def _storage_words(d: ex.DayView) -> str:
    if not d.active:
        return ""
    if d.free is not None:
        return f"free ({d.free})"
    if d.cap_reached:
        return "cap reached"
    return d.storage_status


COMMANDS: list[click.Command] = [explain]
