"""`billing-jobs rejects`: list the source rows that could not be billed, and resolve them.

Thin: parse, call `jobs.rejects`, print. See docs/rejects.md for the workflow.
"""

from __future__ import annotations

import csv
import getpass
import json
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click

from billing_jobs.commands import common
from billing_jobs.commands.common import Context

if TYPE_CHECKING:  # imported by the commands that run (start-up time)
    from rich.console import Console

    from billing_jobs.db.reject_log import RejectRow
    from billing_jobs.jobs import rejects as jr
from billing_jobs.rules.calendar import Month
from billing_jobs.rules.rejects import typed_id

CSV_COLUMNS = (
    "reject_id",
    "source_table",
    "source_id",
    "reason",
    "project_id",
    "period",
    "detail",
    "first_seen_at",
    "status",
    "resolved_at",
    "resolved_by",
    "resolution",
)


def _console() -> Console:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 200)


def _when(ts: datetime | None) -> str:
    return "" if ts is None else f"{ts:%Y-%m-%d %H:%M:%S}"


def _record(row: RejectRow) -> dict[str, Any]:
    """The reject as plain values (times as UTC text; None where there is none)."""
    values = {name: getattr(row, name) for name in CSV_COLUMNS}
    values["first_seen_at"] = _when(row.first_seen_at)
    values["resolved_at"] = _when(row.resolved_at) or None
    return values


def _csv_record(row: RejectRow) -> dict[str, Any]:
    return {k: "" if v is None else v for k, v in _record(row).items()}


def _resolution_text(row: RejectRow) -> str:
    if row.resolved_at is None:
        return row.resolution or ""
    return f"{_when(row.resolved_at)} UTC by {row.resolved_by}: {row.resolution or ''}"


def _call(work: Any) -> Any:
    from billing_jobs.jobs import rejects as jr

    try:
        return work()
    except jr.SchemaNotCurrent as exc:
        raise click.ClickException(str(exc)) from None


def _month(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return str(Month.parse(value))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--month") from None


@click.group("rejects", invoke_without_command=True)
@click.option("--month", "month_text", metavar="YYYY-MM", help="Only rejects of rows of this month.")
@click.option("--table", "source_table", metavar="TABLE", help="Only rows of this source table.")
@click.option("--reason", metavar="REASON", help="Only rejects with this reason.")
@click.option(
    "--status",
    type=click.Choice(["open", "resolved", "closed", "all"]),  # jobs.rejects.STATUS_FILTERS
    default="open",
    show_default=True,
    help="Which rejects: open, resolved (by a person), closed (by a run), or all.",
)
@click.option("--csv", "as_csv", is_flag=True, help="CSV with a header, for finance.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, for scripts.")
@click.pass_context
def rejects_group(
    click_ctx: click.Context,
    month_text: str | None,
    source_table: str | None,
    reason: str | None,
    status: str,
    as_csv: bool,
    as_json: bool,
) -> None:
    """Source rows that could not be billed, with their reason (open ones by default).

    Each reject has a short id to resolve it with (`rejects resolve ID --note ...`).
    A reject that a later run no longer finds (the row was fixed) is closed by that
    run; one that comes back is open again. Ordered by month, table, row id, reason.

    Example: billing-jobs rejects --month 2026-05 --csv > rejects-2026-05.csv
    """
    from rich.markup import escape
    from rich.table import Table

    from billing_jobs.jobs import rejects as jr

    if click_ctx.invoked_subcommand is not None:
        return
    if as_csv and as_json:
        raise click.UsageError("choose one of --csv and --json")
    ctx: Context = click_ctx.obj
    rows: list[RejectRow] = _call(
        lambda: jr.list_rejects(
            ctx.engine, period=_month(month_text), source_table=source_table, reason=reason, status=status
        )
    )
    if as_csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(_csv_record(row) for row in rows)
        sys.stdout.flush()
        return
    if as_json:
        for row in rows:
            click.echo(json.dumps(_record(row), sort_keys=True))
        return
    console = _console()
    table = Table(title_justify="left")
    for name in (
        "id",
        "table",
        "source id",
        "reason",
        "project",
        "period",
        "detail",
        "first seen (UTC)",
        "status",
        "resolution",
    ):
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(
            *(
                escape(text)
                for text in (
                    row.reject_id,
                    row.source_table,
                    row.source_id,
                    row.reason,
                    row.project_id or "",
                    row.period,
                    row.detail,
                    _when(row.first_seen_at),
                    row.status,
                    _resolution_text(row),
                )
            )
        )
    if rows:
        console.print(table)
    console.print(f"{len(rows)} reject(s) ({status})")


@rejects_group.command("resolve")
@click.argument("ids", nargs=-1, required=True, metavar="ID...")
@click.option("--note", required=True, help="Why: what was done about it, or why it needs nothing.")
@click.option("--by", "by", default=None, help="Who resolves them (default: the operating system user).")
@click.pass_obj
def resolve(ctx: Context, ids: tuple[str, ...], note: str, by: str | None) -> None:
    """Mark rejects resolved, recording who, when (UTC) and the note.

    Unknown ids: exit 2, naming them, and nothing is changed. A reject resolved
    or closed before keeps its first resolution (said so).

    Example: billing-jobs rejects resolve 7QK4M2HXP9TB --note "test project, not billable"
    """
    from billing_jobs.jobs import rejects as jr

    if not note.strip():
        raise click.BadParameter("must not be empty", param_hint="--note")
    who = by if by is not None else getpass.getuser()
    if not who.strip():
        raise click.BadParameter("must not be empty", param_hint="--by")
    now = common.utcnow().astimezone(UTC).replace(tzinfo=None)
    wanted = [typed_id(i) for i in ids]
    try:
        outcome: jr.Resolved = _call(
            lambda: jr.resolve_rejects(ctx.engine, wanted, by=who.strip(), note=note.strip(), now=now)
        )
    except jr.UnknownRejects as exc:
        raise click.UsageError(str(exc)) from None
    for row in outcome.resolved:
        click.echo(f"resolved {row.reject_id} ({row.source_table} {row.source_id} {row.reason})")
    for row in outcome.already:
        click.echo(f"already {row.status} {row.reject_id}, kept: {_resolution_text(row)}")


COMMANDS: list[click.Command] = [rejects_group]
