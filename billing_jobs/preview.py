"""Results on stdout: summaries of runs and previews of dry runs.

Tables fit a terminal (rich; plain text when stdout is not one); `--output FILE`
writes the previewed lines as CSV for spreadsheets.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from datetime import date
from typing import Any

from rich.console import Console
from rich.table import Table

from billing_jobs.frames import pd
from billing_jobs.jobs.export import HEADER
from billing_jobs.jobs.runner import Outcome
from billing_jobs.rules.calendar import day_from_number
from billing_jobs.rules.invoice import LINE_ORDER
from billing_jobs.rules.money import format_cents, format_units

# The export's own columns, so a preview opens like the export in a spreadsheet.
PREVIEW_HEADER = HEADER[: HEADER.index("amount") + 1]


def _console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _by_type(df: pd.DataFrame, type_col: str) -> pd.DataFrame:
    if df.empty:
        return pd.DataFrame(columns=[type_col, "rows", "quantity_units", "amount_units"])
    out = df.groupby(type_col, as_index=False).agg(
        rows=("amount_units", "size"),
        quantity_units=("quantity_units", "sum"),
        amount_units=("amount_units", "sum"),
    )
    rank = {t: i for i, t in enumerate(LINE_ORDER)}
    return out.sort_values(type_col, key=lambda s: s.map(rank)).reset_index(drop=True)


def _totals_table(title: str, df: pd.DataFrame, type_col: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column(type_col)
    table.add_column("rows", justify="right")
    table.add_column("quantity", justify="right")
    table.add_column("amount (credits)", justify="right")
    grouped = _by_type(df, type_col)
    for r in grouped.itertuples(index=False):
        table.add_row(
            str(getattr(r, type_col)),
            str(r.rows),
            format_units(r.quantity_units),
            format_units(r.amount_units),
        )
    total = int(grouped["amount_units"].sum()) if len(grouped) else 0
    table.add_row("total", str(int(grouped["rows"].sum()) if len(grouped) else 0), "", format_units(total))
    return table


def _counts_line(counts: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))


def print_nightly(outcome: Outcome, days: list[date], *, dry_run: bool, output: str | None) -> None:
    console = _console()
    preview = outcome.result
    if not days:
        console.print("nightly: nothing to bill (every day up to yesterday is billed)")
        return
    span = f"{days[0]}..{days[-1]}" if len(days) > 1 else str(days[0])
    verb = "would charge" if dry_run else "charged"
    console.print(f"nightly {span} ({len(days)} day(s)) {verb}:")
    c = outcome.counts
    table = Table(title_justify="left")
    table.add_column("charge")
    table.add_column("rows", justify="right")
    table.add_column("amount (credits)", justify="right")
    table.add_row("storage_fee", str(c.get("storage_charges", 0)), format_units(c.get("storage_units", 0)))
    table.add_row("cloud fees", str(c.get("cloud_charges", 0)), format_units(c.get("cloud_units", 0)))
    console.print(table)
    console.print(f"rejected source rows: {c.get('rejects', 0)}")
    if dry_run:
        console.print("dry run: nothing was written")
        if output:
            _write_charges_csv(preview.charges, output)
            console.print(f"charges written to {output}")
    else:
        console.print(f"run {outcome.run_id}: {_counts_line(c)}")


def _write_charges_csv(charges: pd.DataFrame, output: str) -> None:
    cols = ["account_id", "project_id", "charge_type", "charge_date", "quantity", "amount"]
    with open(output, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(cols)
        if charges.empty:
            return
        ordered = charges.sort_values(["account_id", "project_id", "day", "charge_type"])
        writer.writerows(
            (
                r.account_id,
                r.project_id,
                r.charge_type,
                day_from_number(r.day).isoformat(),
                format_units(r.quantity_units),
                format_units(r.amount_units),
            )
            for r in ordered.itertuples(index=False)
        )


def preview_rows(lines: pd.DataFrame, period: str, kind: str) -> Iterable[list[str]]:
    for r in lines.itertuples(index=False):
        yield [
            r.invoice_id,
            kind,
            r.account_id,
            r.project_id,
            period,
            r.line_type,
            format_units(r.quantity_units),
            r.unit_price,
            format_units(r.amount_units),
        ]


def print_month(outcome: Outcome, *, dry_run: bool, output: str | None) -> None:
    console = _console()
    preview = outcome.result
    month, kind = str(preview.month), preview.kind
    if dry_run:
        state = (
            "closed: a re-run would write these adjustments"
            if preview.closed_before
            else f"open: invoices so far, through {preview.through}"
            if preview.through is not None
            else "not closed yet: the invoices month-end would write"
        )
        console.print(f"month-end {month} preview ({state})")
    else:
        state = preview.note or ("adjustments written" if preview.closed_before else "closed")
        console.print(f"month-end {month}: {state}")
    lines = preview.lines
    if preview.invoices is not None and len(preview.invoices):
        table = Table(title=f"{kind} invoices", title_justify="left")
        for col, justify in (
            ("invoice", "left"),
            ("account", "left"),
            ("lines", "right"),
            ("total (credits)", "right"),
        ):
            table.add_column(col, justify=justify)  # type: ignore[arg-type]
        for r in preview.invoices.sort_values("invoice_id").itertuples(index=False):
            table.add_row(r.invoice_id, r.account_id, str(r.line_count), format_units(r.total_units))
        console.print(table)
    elif dry_run or outcome.counts.get("invoices", 0) == 0:
        console.print(
            "no invoice lines" if not preview.closed_before else "no differences: nothing to adjust"
        )
    if dry_run and len(lines):
        console.print(_totals_table("by line type", lines, "line_type"))
    _print_ledger(console, preview.ledger, dry_run=dry_run)
    c = outcome.counts
    if not dry_run:
        console.print(
            f"invoices={c.get('invoices', 0)} lines={c.get('invoice_lines', 0)} "
            f"storage_charges={c.get('storage_charges', 0)} refunds={c.get('refunds', 0)} "
            f"rejects={c.get('rejects', 0)} run={outcome.run_id}"
        )
    else:
        console.print(f"rejected source rows: {c.get('rejects', 0)}; dry run: nothing was written")
        if output:
            with open(output, "w", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh, lineterminator="\n")
                writer.writerow(PREVIEW_HEADER)
                if len(lines):
                    writer.writerows(preview_rows(lines, month, kind))
            console.print(f"preview lines written to {output}")


def _print_ledger(console: Console, ledger: Any, *, dry_run: bool) -> None:
    """The credits ledger a month-end wrote (or would write), by kind."""
    if ledger is None:
        return
    if ledger.skipped:
        console.print(f"credits ledger: not written ({ledger.skipped})")
        return
    totals = ledger.by_kind
    verb = "would write" if dry_run else "wrote"
    if not totals:
        console.print(
            f"credits ledger: no new entries (top-ups rejected: {ledger.counts.get('topups_rejected', 0)})"
        )
        return
    table = Table(title=f"credits ledger ({verb})", title_justify="left")
    for col in ("kind", "entries", "corrections", "credits", "money"):
        table.add_column(col, justify="left" if col == "kind" else "right")
    for kind in ("fund", "draw", "restore", "repay", "expire", "refund", "arrears"):
        part = totals.get(kind)
        if part is None:
            continue
        table.add_row(
            kind,
            str(part.entries),
            str(part.corrections),
            format_units(part.credit_units),
            format_cents(part.money_cents) if part.money_cents is not None else "",
        )
    console.print(table)
    console.print(
        f"top-ups rejected: {ledger.counts.get('topups_rejected', 0)}; "
        f"price exceptions: {ledger.counts.get('price_exceptions', 0)}"
    )


def print_differences(differences: pd.DataFrame) -> None:
    """Held draft lines against a fresh computation, one tab-separated row per line that
    differs ("-" where one side has no such line), never cut to the terminal's width."""

    def amount(value: Any) -> str:
        return "-" if pd.isna(value) else format_units(int(value))

    out = ["held drafts that differ from a fresh computation:"]
    out.append("\t".join(("invoice", "account", "project", "line_type", "held_amount", "fresh_amount")))
    for r in differences.itertuples(index=False):
        held, fresh = amount(r.amount_units_held), amount(r.amount_units_fresh)
        out.append("\t".join((r.invoice_id, r.account_id, r.project_id, r.line_type, held, fresh)))
    print("\n".join(out), flush=True)
