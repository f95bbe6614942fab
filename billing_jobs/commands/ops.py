"""Operations: `runs` (what ran, how it ended) and `status` (a health probe).

Thin: the facts and decisions live in `jobs.status`; this module parses and
prints. `status` exits 1 when anything needs attention, so a monitoring system
can run it as a probe.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click

from billing_jobs import defaults
from billing_jobs.commands import common
from billing_jobs.commands.common import Context

if TYPE_CHECKING:  # imported by the commands that run (start-up time)
    from rich.console import Console

    from billing_jobs.jobs import status as st

EXIT_UNHEALTHY = 1
STATUS_STYLES = {
    "succeeded": "green",
    "failed": "bold red",
    "abandoned": "bold red",
    "running": "yellow",
    "locked": "dim",
}


def _console() -> Console:
    # Wide enough for the table when stdout is a pipe or a file; a terminal sets its own width.
    from rich.console import Console

    return Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 200)


def _now() -> datetime:
    return common.utcnow().astimezone(UTC).replace(tzinfo=None)


def _when(ts: datetime | None) -> str:
    return "-" if ts is None else f"{ts:%Y-%m-%d %H:%M:%S}"


def duration_text(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _counts_text(counts: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in counts.items())


def _styled(status: str) -> str:
    style = STATUS_STYLES.get(status)
    return f"[{style}]{status}[/]" if style else status


def _tables_or_fail(call: Any) -> Any:
    from billing_jobs.jobs import status as st

    try:
        return call()
    except st.TablesMissing as exc:
        raise click.ClickException(str(exc)) from None


@click.command("runs")
@click.option(
    "--limit",
    default=20,
    show_default=True,
    type=click.IntRange(1, 10_000),
    help="How many runs to show.",
)
@click.option("--job", type=click.Choice(list(defaults.JOBS)), default=None, help="Only runs of this job.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, for scripts.")
@click.pass_obj
def runs(ctx: Context, limit: int, job: str | None, as_json: bool) -> None:
    """Recent runs of the jobs, newest first.

    A run whose process died holding the lock shows as 'abandoned' (the next
    run to take the lock records it so; until then it shows so while its lock
    is free).

    Example: billing-jobs runs --job month-end --limit 5
    """
    from rich.table import Table

    from billing_jobs.jobs import status as st

    now = _now()
    found = _tables_or_fail(lambda: st.read_runs(ctx.engine, now, limit=limit, job=job))
    if as_json:
        for run in found:
            click.echo(json.dumps(st.run_record(run, now), sort_keys=True))
        return
    console = _console()
    if not found:
        console.print("no runs recorded" + (f" for job {job}" if job else ""))
        return
    table = Table(title_justify="left")
    for name, justify in (
        ("run", "left"),
        ("job", "left"),
        ("period", "left"),
        ("status", "left"),
        ("started (UTC)", "left"),
        ("duration", "right"),
        ("counts", "left"),
        ("error", "left"),
    ):
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for run in found:
        table.add_row(
            run.run_id[:8],
            run.job,
            run.period,
            _styled(run.status),
            _when(run.started_at),
            duration_text(run.seconds(now)),
            _counts_text(run.key_counts()),
            run.error_line,
        )
    console.print(table)


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
@click.pass_obj
def status(ctx: Context, as_json: bool) -> None:
    """Health of the billing jobs; exits 1 when something needs attention.

    Shows the last billed day, the last closed month, months ended but not
    closed, open rejects, the last run of each job (with the code version that
    ran it, as `billing-jobs --version` prints it) and the lock. Exit status 1
    (each reason on its own line) when a month ended more than
    close_overdue_days days ago and is not closed, when the last nightly run
    failed, when a day is not billed 6 hours after the nightly time, or when a
    closed month's latest reconcile found differences.

    Example (a monitoring probe): billing-jobs status || alert
    """
    from billing_jobs.jobs import status as st

    now = _now()
    settings = ctx.settings
    facts = _tables_or_fail(lambda: st.read_facts(ctx.engine, settings, now))
    problems = st.decide(facts)
    if as_json:
        click.echo(json.dumps(st.status_record(facts, problems), sort_keys=True))
    else:
        _print_status(facts, problems)
    if problems:
        # sys.exit, not ctx.exit: click's non-standalone main returns ctx.exit's code
        # instead of raising it, and `python -m billing_jobs` would then exit 0.
        sys.exit(EXIT_UNHEALTHY)


def _print_status(facts: st.Facts, problems: list[str]) -> None:
    out = click.echo
    out(f"billing status at {facts.now:%Y-%m-%d %H:%M} UTC (billing timezone {facts.timezone})")
    _print_billing(facts)
    _print_rejects(facts)
    _print_runs_and_lock(facts)
    if problems:
        out(f"status: {len(problems)} problem(s)")
        for p in problems:
            out(f"problem: {p}")
    else:
        out("status: ok")


def _print_billing(facts: st.Facts) -> None:
    from billing_jobs.jobs import status as st

    out = click.echo
    out(f"last billed day:   {facts.last_billed_day or 'none'}")
    unbilled = st.unbilled_days(facts)
    if unbilled:
        out(f"unbilled days:     {len(unbilled)} ({st.ranges_text(unbilled)})")
    else:
        out("unbilled days:     none")
    last = facts.last_closed
    closed_at = f" (closed {facts.closed[last]:%Y-%m-%d %H:%M} UTC)" if last else ""
    out(f"last closed month: {last or 'none'}{closed_at}")
    unclosed = st.unclosed_months(facts)
    out("months not closed:" + ("" if unclosed else " none"))
    for m in unclosed:
        flag = ("  held for approval" if m.period in facts.held_months else "") + (
            "  OVERDUE" if m.overdue else ""
        )
        out(f"  {m.period}  ended {m.days_since_end:.1f} days ago{flag}")
    differing = ", ".join(r.period for r in facts.reconcile_differs)
    out(f"months differing:  {differing + ' (latest reconcile)' if differing else 'none'}")


def _print_rejects(facts: st.Facts) -> None:
    out = click.echo
    out(f"open rejects:      {facts.open_rejects}")
    for r in facts.rejects_by_reason:
        out(f"  {r.source_table:<16} {r.reason:<28} {r.count}")
    if facts.rejects_by_period:
        periods = ", ".join(f"{p}: {n}" for p, n in facts.rejects_by_period.items())
        out(f"  by period: {periods}")


def _print_runs_and_lock(facts: st.Facts) -> None:
    out = click.echo
    out("last runs:" + ("" if facts.last_runs else " none recorded"))
    for job, run in facts.last_runs.items():
        error = f"  {run.error_line}" if run.error_line else ""
        out(
            f"  {job:<10} {run.status:<10} {run.period:<24} started {_when(run.started_at)} UTC"
            f"  run {run.run_id}  version {run.code_version or '-'}{error}"
        )
    held = facts.held_lock()
    if held:
        out(
            f"lock:              held: '{held.name}' by run {held.run_id} ({held.job or 'unknown job'}) "
            f"on {held.host} pid {held.pid} since {_when(held.acquired_at)} UTC"
        )
    else:
        out("lock:              free")


COMMANDS: list[click.Command] = [runs, status]
