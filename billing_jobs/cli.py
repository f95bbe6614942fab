"""Command line: parse, call a job, print. The only place that asks the clock.

Exit status: 0 done; 2 bad arguments or settings (one line on stderr);
75 another run holds the lock, or this run lost it (another run took it over:
nothing more was written); 1 any other failure (nothing half-written).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from billing_jobs import __version__, lifeline, logs
from billing_jobs.commands import register_commands
from billing_jobs.commands.common import Context, check_export_target, export_options, utcnow, yesterday_in
from billing_jobs.defaults import DEFAULT_DB_URL
from billing_jobs.errors import DatabaseUrlError, LockHeld, LockLost, SettingsError
from billing_jobs.redact import scrub
from billing_jobs.rules.calendar import Month

if TYPE_CHECKING:
    from billing_jobs.db.reads import Shard
    from billing_jobs.settings import Settings

EX_USAGE = 2
_db_url: list[str | None] = [None]  # the command's database, for the line of a failure to connect
EX_TEMPFAIL = 75


def _parse_month(value: str) -> Month:
    try:
        return Month.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _parse_date(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"expected a date YYYY-MM-DD, got {value!r}") from None


def progress_for(label: str) -> tuple[Callable[[int, int, str], None], Callable[[], None]]:
    """A progress bar on stderr when it is a terminal; nothing (logs only) otherwise.

    Returns (update(done, total, text), stop). Stdout stays for results alone.
    """
    if not sys.stderr.isatty():
        return (lambda done, total, text: None), (lambda: None)
    from rich.console import Console
    from rich.progress import Progress

    bar = Progress(console=Console(file=sys.stderr), transient=True)
    bar.start()
    task = bar.add_task(label, total=None)

    def update(done: int, total: int, text: str) -> None:
        bar.update(task, completed=done, total=total, description=f"{label} {text}")

    return update, bar.stop


def _chunk_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """`--projects-per-chunk` (env BILLING_PROJECTS_PER_CHUNK): an operations knob.

    Each chunk of accounts is loaded, computed and written in its own transaction;
    smaller chunks use less memory and shorter transactions, at some speed cost.
    The result does not depend on it.
    """
    return click.option(
        "--projects-per-chunk",
        "projects_per_chunk",
        envvar="BILLING_PROJECTS_PER_CHUNK",
        default=10_000,
        show_default=True,
        type=click.IntRange(min=1),
        help="Accounts are processed in chunks of about this many projects, one transaction "
        "each (env BILLING_PROJECTS_PER_CHUNK). Smaller chunks: less memory, shorter transactions.",
    )(command)


def _workers_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """`--workers` (env BILLING_WORKERS): chunks run on this many processes (None: one per CPU)."""
    return click.option(
        "--workers",
        "workers",
        envvar="BILLING_WORKERS",
        default=None,
        show_default="the number of CPUs",
        type=click.IntRange(min=1),
        help="Chunks are processed by this many worker processes, each with its own database "
        "connection (env BILLING_WORKERS). On SQLite they read in parallel and write one at a "
        "time. The result does not depend on it.",
    )(command)


def _shard_from(text: str | None) -> Shard | None:
    """`--shard I/N`, else BILLING_SHARD, else JOB_COMPLETION_INDEX with BILLING_SHARDS; None: all."""
    from billing_jobs.db.reads import Shard

    source = "--shard"
    if text is None and os.environ.get("BILLING_SHARD"):
        text, source = os.environ["BILLING_SHARD"], "BILLING_SHARD"
    if text is None and os.environ.get("JOB_COMPLETION_INDEX") is not None:
        count = os.environ.get("BILLING_SHARDS")
        if not count:
            raise click.UsageError("JOB_COMPLETION_INDEX is set but BILLING_SHARDS (the shard count) is not")
        text, source = f"{os.environ['JOB_COMPLETION_INDEX']}/{count}", "JOB_COMPLETION_INDEX/BILLING_SHARDS"
    if text is None:
        return None
    index, _, count = text.partition("/")
    try:
        shard = Shard(int(index), int(count))
    except ValueError:
        raise click.UsageError(f"{source} {text!r}: expected I/N, for example 0/4") from None
    if not 0 <= shard.index < shard.count:
        raise click.UsageError(f"{source} {text!r}: need 0 <= I < N")
    return shard


def _month_to_close(
    settings: Settings, today: date, month_text: str | None, approve_text: str | None, *, dry_run: bool
) -> Month:
    """The month a `month-end` acts on: checked against the effective date and today."""
    from billing_jobs.jobs.month_end import month_has_ended

    if approve_text is not None:
        if month_text:
            raise click.UsageError("--approve M names the month: give no --month")
        month = _parse_month(approve_text)
    else:
        month = _parse_month(month_text) if month_text else Month.of(today).previous()
    if month.last_day < settings.effective_from:
        raise click.UsageError(
            f"month {month} ends before the effective date {settings.effective_from} "
            "(storage_fee.effective_from): nothing is billed in it"
        )
    if not dry_run and not month_has_ended(month, today):
        raise click.UsageError(
            f"month {month} has not ended in {settings.timezone}; preview it with --dry-run"
        )
    return month


def _ledger_from(text: str | None, month: Month, *, shard: Shard | None, hold: bool) -> Month | None:
    """`--ledger-from P`: a month, at most the month closed; not with what writes no ledger."""
    if text is None:
        return None
    try:
        period = Month.parse(text)
    except ValueError as exc:
        raise click.UsageError(f"--ledger-from: {exc}") from None
    if period > month:
        raise click.UsageError(
            f"--ledger-from {period} is after the month closed ({month}): give a period up to it"
        )
    if shard is not None or hold:
        raise click.UsageError(
            "--ledger-from takes neither --shard nor --hold (they write no credits ledger; "
            "give it to --finalize or --approve)"
        )
    return period


def _check_month_end_flags(
    *, dry_run: bool, shard: str | None, finalize: bool, hold: bool, approve: bool
) -> None:
    if approve and (dry_run or shard or finalize or hold):
        raise click.UsageError("--approve M takes no --month, --dry-run, --shard, --finalize or --hold")
    if hold and (dry_run or shard or finalize):
        raise click.UsageError("--hold takes neither --dry-run, --shard nor --finalize")
    if finalize and (dry_run or shard):
        raise click.UsageError("--finalize takes neither --dry-run nor --shard")


def _refuse_closed_day(ctx: Context, day: date) -> None:
    """A day of a closed month is billed again only by re-closing its month."""
    from billing_jobs.jobs.month_end import is_closed

    month = Month.of(day)
    with ctx.engine.connect() as conn:
        closed = is_closed(conn, month)
    if closed:
        raise click.UsageError(
            f"--date {day} is in month {month}, which is closed: recompute it with "
            f"`billing-jobs month-end --month {month}` (it writes an adjustment if anything changed; "
            f"preview it with --dry-run)"
        )


def _ensure_schema(ctx: Context, *, dry_run: bool) -> bool:
    """Migrate the jobs' tables before a writing run; True when they exist."""
    from sqlalchemy import inspect

    from billing_jobs.db.engine import schema_is_current, upgrade

    engine = ctx.engine
    if dry_run:
        return "month_closes" in inspect(engine).get_table_names()
    if not schema_is_current(engine):
        logs.get_logger().info("db.upgrade", reason="schema not at head")
        upgrade(engine)
    return True


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--db-url",
    envvar="BILLING_DB_URL",
    default=DEFAULT_DB_URL,
    show_default=True,
    help="SQLAlchemy URL of the database (env BILLING_DB_URL).",
)
@click.option(
    "--config",
    "config",
    envvar="BILLING_CONFIG",
    default=None,
    help="Settings TOML file (env BILLING_CONFIG); built-in defaults otherwise.",
)
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="Least severe log level written to stderr.",
)
@click.version_option(__version__, prog_name="billing-jobs")
@click.pass_context
def cli(click_ctx: click.Context, db_url: str, config: str | None, log_level: str) -> None:
    """Billing jobs: nightly charges, month close, invoices and export.

    Results go to stdout, logs to stderr (JSON when stderr is not a terminal).
    """
    logs.configure(log_level)
    _db_url[0] = db_url
    click_ctx.obj = Context(db_url=db_url, config=config)
    click_ctx.call_on_close(click_ctx.obj.close)
    if click_ctx.invoked_subcommand is not None and "--help" not in sys.argv and "-h" not in sys.argv:
        # Settings are checked before any command runs: a bad file is exit 2, never a half run.
        _ = click_ctx.obj.settings


@cli.group()
def db() -> None:
    """Database maintenance."""


@db.command("upgrade")
@click.pass_obj
def db_upgrade(ctx: Context) -> None:
    """Create or migrate the jobs' own tables (safe to repeat)."""
    from billing_jobs.db.engine import upgrade

    upgrade(ctx.engine)
    click.echo(f"database schema is up to date ({ctx.engine.url.render_as_string(hide_password=True)})")


@cli.command()
@click.option(
    "--date",
    "day",
    default=None,
    metavar="YYYY-MM-DD",
    help="Bill this billing day. Default: every unbilled day up to yesterday.",
)
@click.option("--dry-run", is_flag=True, help="Show what would be charged; write nothing.")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="With --dry-run: also write the charges as CSV to this file.",
)
@_chunk_option
@_workers_option
@click.pass_obj
def nightly(
    ctx: Context,
    day: str | None,
    dry_run: bool,
    output: str | None,
    projects_per_chunk: int,
    workers: int | None,
) -> None:
    """Charge billing days: storage fees and cloud service fees."""
    from billing_jobs.jobs import nightly as job
    from billing_jobs.jobs.runner import run_job
    from billing_jobs.jobs.workers import default_workers
    from billing_jobs.preview import print_nightly

    settings = ctx.settings
    now = utcnow()
    yesterday = yesterday_in(settings, now)
    if day is not None:
        target = _parse_date(day)
        if target > yesterday:
            raise click.UsageError(
                f"--date {target} has not ended yet in {settings.timezone}: bill it once it has "
                f"(latest billable day: {yesterday})"
            )
        if target < settings.effective_from:
            raise click.UsageError(
                f"--date {target} is before the effective date {settings.effective_from} "
                "(storage_fee.effective_from): nothing is billed before it"
            )
    has_schema = _ensure_schema(ctx, dry_run=dry_run)
    if day is not None and has_schema and not dry_run:
        _refuse_closed_day(ctx, target)
    if day is not None:
        days = [target]
    elif has_schema:
        days = job.days_to_bill(ctx.engine, settings.effective_from, yesterday)
    else:
        days = job.days_to_bill_fresh(settings.effective_from, yesterday)
    period = f"{days[0]}..{days[-1]}" if days else "nothing to bill"
    update, stop = progress_for("nightly")
    try:
        outcome = run_job(
            ctx.engine,
            settings,
            "nightly",
            period=period,
            arguments={"date": day, "dry_run": dry_run},
            now=now,
            dry_run=dry_run,
            body=lambda run: job.bill_days(run, days, projects_per_chunk, workers or default_workers()),
            progress=update,
        )
    finally:
        stop()
    print_nightly(outcome, days, dry_run=dry_run, output=output)


@cli.command("month-end")
@click.option(
    "--month",
    "month_text",
    default=None,
    metavar="YYYY-MM",
    help="The billing month to close. Default: the previous month.",
)
@click.option(
    "--dry-run", is_flag=True, help="Show the invoices (or adjustments) it would write; write nothing."
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="With --dry-run: also write the previewed lines as CSV to this file.",
)
@click.option(
    "--shard",
    "shard_text",
    default=None,
    metavar="I/N",
    help="Close only shard I (0-based) of N of the accounts and leave its invoices as drafts "
    "for --finalize; N shards run at once (each its own run record and lock). Default: "
    "BILLING_SHARD, or JOB_COMPLETION_INDEX of N=BILLING_SHARDS (a Kubernetes Indexed Job).",
)
@click.option(
    "--finalize",
    is_flag=True,
    help="Finalize a sharded close: exit 0 once every shard's drafts are complete and consistent "
    "(nothing to do if already final), 75 while a shard still runs, 1 naming missing shards.",
)
@click.option(
    "--hold",
    is_flag=True,
    help="Write the month's drafts and stop: finance reviews them and finalizes them with "
    "--approve. ([billing] require_approval = true makes every month-end hold.)",
)
@click.option(
    "--approve",
    "approve_text",
    default=None,
    metavar="YYYY-MM",
    help="Finalize the held drafts of this month, only if they still equal a fresh computation "
    "(else exit 1 with the differences); then write its credits ledger.",
)
@click.option(
    "--reprice",
    is_flag=True,
    help="Re-close a closed month with the settings in force now although they differ from those "
    "it was closed with (without it such a run exits 2 naming the changed keys).",
)
@click.option(
    "--confirm",
    is_flag=True,
    help="Write a re-close whose adjustments exceed [monitoring] adjustment_confirm_share of the "
    "month's invoiced total (without it such a run shows the differences and exits 2).",
)
@click.option(
    "--ledger-from",
    "ledger_from_text",
    default=None,
    metavar="YYYY-MM",
    help="The credits ledger looks for late data back to this period (at most --month) instead "
    "of the [ledger] late_data_months periods before the month; a period before the first "
    "written one means all of them. With --dry-run: preview what it would correct.",
)
@_chunk_option
@_workers_option
@click.pass_obj
def month_end(
    ctx: Context,
    month_text: str | None,
    dry_run: bool,
    output: str | None,
    shard_text: str | None,
    finalize: bool,
    hold: bool,
    approve_text: str | None,
    reprice: bool,
    confirm: bool,
    ledger_from_text: str | None,
    projects_per_chunk: int,
    workers: int | None,
) -> None:
    """Close a billing month: recompute, waive, invoice (or adjust a closed month).

    At scale the accounts can be closed in shards on several machines: run
    `month-end --month M --shard I/N` for I = 0..N-1 (at the same time), then
    `month-end --month M --finalize`.

    For finance's sign-off: `month-end --month M --hold` writes drafts, then
    `month-end --approve M` finalizes them.
    """
    from billing_jobs.db.lock import writer_lock_name
    from billing_jobs.jobs import month_controls as controls
    from billing_jobs.jobs import month_end as job
    from billing_jobs.jobs.runner import Run, run_job
    from billing_jobs.jobs.workers import default_workers
    from billing_jobs.preview import print_month

    settings = ctx.settings
    now = utcnow()
    today = now.astimezone(settings.zone).date()
    approve = approve_text is not None
    month = _month_to_close(settings, today, month_text, approve_text, dry_run=dry_run)
    _check_month_end_flags(dry_run=dry_run, shard=shard_text, finalize=finalize, hold=hold, approve=approve)
    # A month that has not ended is previewed through yesterday: "the invoices so far".
    through = None if job.month_has_ended(month, today) else today - timedelta(days=1)
    shard = _shard_from(shard_text) if not finalize else None
    if settings.require_approval and not (dry_run or approve or finalize or shard is not None):
        hold = True
    ledger_from = _ledger_from(ledger_from_text, month, shard=shard, hold=hold)
    has_schema = _ensure_schema(ctx, dry_run=dry_run)
    try:
        controls.check_settings(ctx.engine, month, settings, reprice=reprice)
    except controls.SettingsChanged as exc:
        raise click.UsageError(str(exc)) from None
    arguments: dict[str, object] = {"month": str(month), "dry_run": dry_run}
    for flag, value in (
        ("shard", str(shard) if shard else None),
        ("finalize", finalize),
        ("hold", hold),
        ("approve", approve),
        ("reprice", reprice),
        ("confirm", confirm),
        ("ledger_from", str(ledger_from) if ledger_from else None),
    ):
        if value:
            arguments[flag] = value
    chunk_workers = workers or default_workers()

    def body(run: Run) -> object:
        repriced = controls.check_settings(run.engine, month, settings, reprice=reprice)
        if repriced:
            run.counts["repriced"] = repriced
        if approve:
            return job.approve_month(
                run, month, projects_per_chunk, workers=chunk_workers, ledger_from=ledger_from
            )
        if finalize:
            return job.finalize_shards(run, month, ledger_from=ledger_from)
        return job.close_month(
            run,
            month,
            projects_per_chunk,
            fresh_schema=not has_schema,
            through=through,
            workers=chunk_workers,
            shard=shard,
            hold=hold,
            confirm=confirm or dry_run,
            ledger_from=ledger_from,
        )

    update, stop = progress_for("month-end")
    try:
        outcome = run_job(
            ctx.engine,
            settings,
            "month-end",
            period=str(month),
            arguments=arguments,
            now=now,
            dry_run=dry_run,
            body=body,
            progress=update,
            lock_name=writer_lock_name(*((shard.index, shard.count) if shard else ())),
        )
    except job.ShardsIncomplete as exc:
        _fail(f"error: {exc}", 1)
    except controls.SettingsChanged as exc:
        _fail(f"error: {exc}", EX_USAGE)
    except controls.NothingHeld as exc:
        _fail(f"error: {exc}", EX_USAGE)
    except controls.NeedsConfirm as exc:
        stop()
        from billing_jobs.jobs.runner import Outcome

        print_month(Outcome("-", "preview", {}, 0.0, exc.preview), dry_run=True, output=output)
        _fail(f"error: {exc}", EX_USAGE)
    except controls.ApprovalDiffers as exc:
        stop()
        from billing_jobs.preview import print_differences

        print_differences(exc.differences)
        _fail(f"error: {exc}", 1)
    finally:
        stop()
    print_month(outcome, dry_run=dry_run, output=output)


@cli.command()
@click.option("--month", "month_text", required=True, metavar="YYYY-MM", help="The billing month.")
@export_options
@click.option("--headers", is_flag=True, help="One row per invoice (its header) instead of per line.")
@click.pass_obj
def export(ctx: Context, month_text: str, output: str | None, fmt: str, headers: bool) -> None:
    """Write every invoice line (or invoice header) of a month as CSV or Parquet."""
    from sqlalchemy import inspect as sa_inspect

    from billing_jobs.jobs.export import month_headers, month_lines
    from billing_jobs.jobs.warehouse import write_export

    month = _parse_month(month_text)
    check_export_target(fmt, output)
    if "month_closes" not in sa_inspect(ctx.engine).get_table_names():
        raise click.ClickException("the jobs' tables do not exist yet: run `billing-jobs db upgrade`")
    rows = (month_headers if headers else month_lines)(ctx.engine, str(month))
    n = write_export(rows, fmt, output)
    logs.get_logger().info(
        "export.done",
        period=str(month),
        **{"invoices" if headers else "lines": n},
        format=fmt,
        output=output or "stdout",
    )


@cli.command()
@click.option(
    "--accounts",
    default=40,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="How many accounts to generate.",
)
@click.option("--seed", default=7, show_default=True, type=int, help="Random seed (same seed, same data).")
@click.option(
    "--as-of",
    "as_of",
    default=None,
    metavar="YYYY-MM-DD",
    help="Last day of generated activity. Default: yesterday (billing timezone).",
)
@click.option("--fresh", is_flag=True, help="Delete the SQLite database file first (SQLite only).")
@click.option(
    "--bare",
    is_flag=True,
    help="Only the source data: close no month and bill no day (to run the jobs yourself).",
)
@click.pass_obj
def demo(ctx: Context, accounts: int, seed: int, as_of: str | None, fresh: bool, bare: bool) -> None:
    """Create the source tables, fill them with realistic demo data, and run the jobs
    as the scheduler would have: every month before the last one closed (credits
    ledger included), every day of the last one billed up to --as-of."""
    from billing_jobs.db.engine import upgrade
    from billing_jobs.demo import generate_demo

    url = ctx.engine.url
    yesterday = yesterday_in(ctx.settings, utcnow())
    last = _parse_date(as_of) if as_of is not None else yesterday
    if last > yesterday and not bare:
        raise click.UsageError(
            f"--as-of {last} is after yesterday ({yesterday}): the jobs bill only days that have ended; "
            "add --bare for the data alone"
        )
    if fresh:
        if url.get_backend_name() != "sqlite" or not url.database:
            raise click.UsageError("--fresh only deletes a SQLite database file")
        ctx.engine.dispose()
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(url.database + suffix).unlink(missing_ok=True)
    try:
        summary = generate_demo(ctx.engine, seed=seed, accounts=accounts, as_of=last)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    upgrade(ctx.engine)
    click.echo(f"demo data written to {url.render_as_string(hide_password=True)}, activity up to {last}:")
    for name, value in summary.counts().items():
        click.echo(f"  {name}: {value:,} rows")
    click.echo(f"  deliberately bad rows (to be rejected): {len(summary.bad_rows)}")
    click.echo(f"  deliberately bad top-ups (to be rejected): {len(summary.bad_top_ups)}")
    shown = Month.of(last).previous()
    if bare:
        click.echo(
            f"next: billing-jobs month-end --month {shown} && billing-jobs export --month {shown} "
            f"&& billing-jobs credits report --month {shown}"
        )
        return
    closed, billed = _run_as_scheduled(ctx, last, yesterday)
    click.echo(f"months closed, credits ledger included: {closed}")
    click.echo(f"days billed by the nightly job: {billed}")
    click.echo(
        f"next: billing-jobs status && billing-jobs export --month {shown} "
        f"&& billing-jobs credits report --month {shown}"
    )


def _run_as_scheduled(ctx: Context, last: date, yesterday: date) -> tuple[str, str]:
    """The jobs the scheduler would have run by the day after `last`, in this process:
    month-end of every month from the effective date's up to the one before `last`'s,
    then the nightly job for each day of `last`'s month up to `last`. Their output is
    kept back unless one fails (then it is printed, and the demo fails)."""
    import contextlib
    import io

    from billing_jobs.scheduler import inprocess_runner

    settings = ctx.settings
    run = inprocess_runner(ctx.db_url, ctx.config, log_level="ERROR")
    month, final = Month.of(settings.effective_from), Month.of(last)
    jobs: list[list[str]] = []
    closed: list[Month] = []
    while month < final:
        jobs.append(["month-end", "--month", str(month)])
        closed.append(month)
        month = month.next()
    first = max(final.first_day, settings.effective_from)
    if last == yesterday:
        jobs.append(["nightly"])  # every unbilled day up to yesterday
    else:
        jobs += [
            ["nightly", "--date", str(first + timedelta(days=n))] for n in range((last - first).days + 1)
        ]
    for argv in jobs:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = run(argv)
        if code != 0:
            click.echo(out.getvalue(), nl=False)
            _fail(f"demo: `billing-jobs {' '.join(argv)}` failed (exit {code})", code)
    span = f"{closed[0]}..{closed[-1]}" if closed else "none"
    days = f"{first}..{last}" if first <= last else "none"
    return span, days


register_commands(cli)


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"billing-jobs: {scrub(message)}", err=True)
    sys.exit(code)


class Terminated(SystemExit):
    """SIGTERM (Kubernetes, `docker stop`) unwinds like an error: the open transaction
    rolls back, the run is recorded as failed and its lock released for the next run."""

    def __str__(self) -> str:
        return "stopped by SIGTERM"


def _stop_on_sigterm(signum: int, _frame: object) -> None:
    raise Terminated(128 + signum)


def main(argv: list[str] | None = None) -> NoReturn:
    """Console entry point: maps errors to exit statuses with one line each; always exits."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
        # A run started by `billing-jobs schedule` stops (SIGTERM) when the scheduler ends.
        lifeline.die_with_named_parent(signal.SIGTERM)
    try:
        code = cli.main(args=argv, prog_name="billing-jobs", standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        # The reader went away (`export | head`): stop quietly, as other Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)
    except click.exceptions.Abort:
        _fail("aborted", 1)
    except click.UsageError as exc:
        _fail(f"error: {exc.format_message()}", EX_USAGE)
    except (SettingsError, DatabaseUrlError) as exc:
        _fail(f"error: {exc}", EX_USAGE)
    except LockHeld as exc:
        _fail(str(exc), EX_TEMPFAIL)
    except LockLost as exc:
        _fail(f"this run lost its lock: {exc}", EX_TEMPFAIL)
    except click.ClickException as exc:
        _fail(f"error: {exc.format_message()}", exc.exit_code)
    except Exception as exc:
        from billing_jobs.db.failures import connection_failure, missing_table

        line = connection_failure(exc, _db_url[0]) or missing_table(exc)
        if line is not None:
            logs.get_logger().debug("command.failed", exc_info=True)  # the traceback: --log-level DEBUG
            _fail(f"error: {line}", 1)
        logs.get_logger().exception("command.failed")
        first_line = (str(exc).strip().splitlines() or [""])[0]
        _fail(f"failed: {type(exc).__name__}: {first_line}", 1)
