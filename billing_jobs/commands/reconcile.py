"""`billing-jobs reconcile`: do closed months still agree with their data?

Thin: the checks live in `jobs.reconcile`; this module parses, runs the job
and prints. Exit 0 when every month agrees, 1 when any differs, 75 when a
month could not be checked because a close of it kept running (or another
reconcile holds its lock), 2 for bad arguments (a month that is not closed).
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import click

from billing_jobs import logs
from billing_jobs.commands.common import Context, utcnow
from billing_jobs.rules.calendar import Month
from billing_jobs.rules.money import format_units

if TYPE_CHECKING:
    import pandas as pd

    from billing_jobs.jobs.reconcile import MonthCheck

# The two checks (as in `rules.reconcile`, not imported here: it loads pandas).
RECOMPUTED, STORED = "recomputed", "stored"

EXIT_DIFFERS = 1
EXIT_BUSY = 75
HEADER = ("month", "check", "account_id", "line_type", "invoiced", "recomputed/stored", "difference")
LEDGER_HEADER = ("month", "check", "account_id", "lot_id", "kind", "written", "recomputed", "difference")


def _month(value: str | None, option: str) -> Month | None:
    if value is None:
        return None
    try:
        return Month.parse(value)
    except ValueError as exc:
        raise click.UsageError(f"{option}: {exc}") from None


@click.command("reconcile")
@click.option("--month", "month_text", default=None, metavar="YYYY-MM", help="Check this closed month.")
@click.option(
    "--since",
    "since_text",
    default=None,
    metavar="YYYY-MM",
    help="Check every closed month from M on.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout, for scripts.")
@click.option(
    "--workers",
    envvar="BILLING_WORKERS",
    default=None,
    type=click.IntRange(min=1),
    help="Worker processes for the chunks (env BILLING_WORKERS; default: the number of CPUs).",
)
@click.option(
    "--projects-per-chunk",
    envvar="BILLING_PROJECTS_PER_CHUNK",
    default=10_000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Accounts are read in chunks of about this many projects (env BILLING_PROJECTS_PER_CHUNK).",
)
@click.pass_obj
def reconcile(
    ctx: Context,
    month_text: str | None,
    since_text: str | None,
    as_json: bool,
    workers: int | None,
    projects_per_chunk: int,
) -> None:
    """Check closed months against their source data and their stored charges.

    For each closed month: its finalized invoices (regular and adjustments) are
    compared with the month recomputed from the source tables now (what
    `month-end --month M` would write as adjustments), and with the month's
    stored charges. Its credits ledger, once written, is compared with the
    rules replayed from the balances written at the end of the month before
    (settled periods included). Prints each difference per account and line
    type (per account, lot and kind for the ledger), and one summary line per
    month; records the result (see `status`).

    \b
    Months: --month M, or --since M (every closed month from M on), or by
    default the last [schedule] reconcile_months closed months.
    Exit status: 0 all agree, 1 a month differs (fix: month-end --month M; for
    the ledger: month-end --month LATEST --ledger-from M), 75 a close of the
    month kept running during the check (try again later).

    Example: billing-jobs reconcile --since 2026-04
    """
    from billing_jobs.db.engine import schema_is_current, upgrade
    from billing_jobs.jobs import reconcile as job
    from billing_jobs.jobs.runner import run_job
    from billing_jobs.jobs.workers import default_workers

    month, since = _month(month_text, "--month"), _month(since_text, "--since")
    if month is not None and since is not None:
        raise click.UsageError("give --month or --since, not both")
    settings = ctx.settings
    if not schema_is_current(ctx.engine):
        logs.get_logger().info("db.upgrade", reason="schema not at head")
        upgrade(ctx.engine)
    try:
        months = job.months_to_reconcile(ctx.engine, month=month, since=since, last=settings.reconcile_months)
    except job.MonthNotClosed as exc:
        raise click.UsageError(str(exc)) from None
    period = f"{months[0]}..{months[-1]}" if len(months) > 1 else (str(months[0]) if months else "none")
    outcome = run_job(
        ctx.engine,
        settings,
        "reconcile",
        period=period,
        arguments={"month": month_text, "since": since_text, "months": [str(m) for m in months]},
        now=utcnow(),
        body=lambda run: job.reconcile(run, months, projects_per_chunk, workers or default_workers()),
        lock_name=job.RECONCILE_LOCK,
    )
    checks: list[MonthCheck] = outcome.result
    overall = _overall(checks)
    if as_json:
        record = {
            "run_id": outcome.run_id,
            "status": overall,
            "months": [_month_record(c) for c in checks],
            "ledger_fix": ledger_fixes(checks),
        }
        click.echo(json.dumps(record, sort_keys=True))
    else:
        _print(checks, overall)
    from billing_jobs.db.reconcile_log import BUSY, DIFFERS

    if overall == DIFFERS:
        sys.exit(EXIT_DIFFERS)
    if overall == BUSY:
        sys.exit(EXIT_BUSY)


def _overall(checks: list[MonthCheck]) -> str:
    statuses = {c.status for c in checks}
    for status in ("differs", "busy"):
        if status in statuses:
            return status
    return "ok"


def _rows(name: str, frame: pd.DataFrame) -> list[dict[str, Any]]:
    other = "recomputed" if name == RECOMPUTED else "stored"
    return [
        {
            "account_id": r.account_id,
            "line_type": r.line_type,
            "invoiced": format_units(r.invoiced_units),
            other: format_units(r.other_units),
            "difference": format_units(r.difference_units),
            "invoiced_quantity": format_units(r.invoiced_quantity),
            f"{other}_quantity": format_units(r.other_quantity),
        }
        for r in frame.itertuples(index=False)
    ]


def _ledger_rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [
        {
            "account_id": r.account_id,
            "lot_id": r.lot_id or "",
            "kind": r.kind,
            "written": format_units(r.written_units),
            "recomputed": format_units(r.recomputed_units),
            "difference": format_units(r.difference_units),
            "written_money": _cents(r.written_money),
            "recomputed_money": _cents(r.recomputed_money),
        }
        for r in frame.itertuples(index=False)
    ]


def _cents(value: int) -> str:
    sign = "-" if value < 0 else ""
    return f"{sign}{abs(value) // 100}.{abs(value) % 100:02d}"


def ledger_fixes(checks: list[MonthCheck]) -> list[str]:
    """The month-end runs that correct the ledger differences found: one, from the
    earliest month whose ledger differs, re-closing the latest written period."""
    differing = [c for c in checks if len(c.ledger)]
    if not differing:
        return []
    first = min(differing, key=lambda c: c.month)
    latest = first.latest_period or str(first.month)
    return [f"billing-jobs month-end --month {latest} --ledger-from {first.month}"]


def _month_record(check: MonthCheck) -> dict[str, Any]:
    return {
        "period": str(check.month),
        "status": check.status,
        "accounts": check.accounts,
        "differences": check.differences,
        "difference_abs": format_units(check.difference_units),
        RECOMPUTED: _rows(RECOMPUTED, check.recomputed),
        STORED: _rows(STORED, check.stored),
        "ledger": _ledger_rows(check.ledger),
    }


def _print(checks: list[MonthCheck], overall: str) -> None:
    if not checks:
        click.echo("no closed month to reconcile")
        return
    table: list[tuple[str, ...]] = [HEADER]
    for c in checks:
        for name, frame in ((RECOMPUTED, c.recomputed), (STORED, c.stored)):
            table.extend(
                (
                    str(c.month),
                    name,
                    r.account_id,
                    r.line_type,
                    format_units(r.invoiced_units),
                    format_units(r.other_units),
                    format_units(r.difference_units),
                )
                for r in frame.itertuples(index=False)
            )
    _table(table)
    ledger: list[tuple[str, ...]] = [LEDGER_HEADER]
    for c in checks:
        ledger.extend(
            (
                str(c.month),
                "ledger",
                r.account_id,
                r.lot_id or "-",
                r.kind,
                format_units(r.written_units),
                format_units(r.recomputed_units),
                format_units(r.difference_units),
            )
            for r in c.ledger.itertuples(index=False)
        )
    _table(ledger)
    for c in checks:
        click.echo(_summary(c))
    differing = [str(c.month) for c in checks if len(c.recomputed) or len(c.stored)]
    fixes = [f"billing-jobs month-end --month {m}" for m in differing] + ledger_fixes(checks)
    count = sum(c.status == "differs" for c in checks)
    if count:
        click.echo(f"reconcile: {count} of {len(checks)} month(s) differ; adjust with: {' ; '.join(fixes)}")
    else:
        click.echo(f"reconcile: {overall}")


def _table(rows: list[tuple[str, ...]]) -> None:
    if len(rows) > 1:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _summary(check: MonthCheck) -> str:
    if check.status == "ok":
        return (
            f"{check.month}: ok: invoices agree with the source data and the stored charges "
            f"({check.accounts} accounts)"
        )
    if check.status == "busy":
        return f"{check.month}: busy: a close of this month kept running during the check; try again"
    ledger = f", {len(check.ledger)} ledger" if len(check.ledger) else ""
    return (
        f"{check.month}: differs: {check.differences} difference(s) "
        f"({len(check.recomputed)} recomputed, {len(check.stored)} stored{ledger}), "
        f"{format_units(check.difference_units)} credits in absolute value ({check.accounts} accounts)"
    )


COMMANDS: list[click.Command] = [reconcile]
