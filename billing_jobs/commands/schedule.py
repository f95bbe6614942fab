"""`billing-jobs schedule` (the long-running scheduler) and `billing-jobs metrics`."""

from __future__ import annotations

import sys

import click

from billing_jobs import logs
from billing_jobs.commands.common import Context, utcnow

SCHEDULE_HELP = """Run the nightly, month-end and reconcile jobs on their schedule until stopped.

\b
Jobs, at the [schedule] times of the settings, in the billing timezone:
  nightly    every day at nightly_at (default 02:30): `billing-jobs nightly`,
             which bills every day not billed yet up to yesterday;
  month-end  on day month_end_day at month_end_at (default day 1, 04:00):
             `billing-jobs month-end`, which closes the previous month;
  reconcile  every day at reconcile_at (default 03:30), unless
             reconcile_months = 0: `billing-jobs reconcile` of the last
             reconcile_months closed months; with auto_adjust = true, each
             month found differing is re-closed (`billing-jobs month-end
             --month M`) and checked again.

Each run is a child process `python -m billing_jobs ...` with the same
database and settings, exactly like a run from cron. A run that finds the lock
taken (exit 75) is logged as a warning and tried again every 5 minutes within
misfire_grace_seconds; any other failure is logged and the scheduler keeps
running. A run late by less than misfire_grace_seconds (process suspended,
previous run still busy) still starts; missed runs coalesce into one.

On start, unless --no-catch-up-on-start: when the last successful nightly
ended more than a day ago (or never), the nightly runs at once (it bills every
missed day); when the previous month is still not closed after its month-end
time, the month-end runs at once too.

SIGTERM or SIGINT stops it cleanly: no new runs start, a running one
finishes, then it exits 0. Give it time to finish a run (Kubernetes:
terminationGracePeriodSeconds). The schedule is read once at start: restart it
after changing [schedule] or [billing] timezone.

--once JOB runs one job right away (in this process, no retry) and exits with
its exit status (0, 1, 2 or 75), e.g. for a Kubernetes CronJob; `--once
reconcile` re-closes differing months too when auto_adjust is on.
"""


@click.command("schedule", help=SCHEDULE_HELP)
@click.option(
    "--catch-up-on-start/--no-catch-up-on-start",
    default=True,
    show_default=True,
    help="On start, run a nightly (and month-end) that is overdue right away.",
)
@click.option(
    "--once",
    type=click.Choice(["nightly", "month-end", "reconcile"]),
    default=None,
    help="Run this job once, now, and exit with its exit status.",
)
@click.pass_obj
def schedule(ctx: Context, catch_up_on_start: bool, once: str | None) -> None:
    from billing_jobs import scheduler as sched

    settings = ctx.settings  # bad settings: exit 2 before anything starts
    log_level = str(click.get_current_context().find_root().params.get("log_level", "INFO"))
    log = logs.get_logger()
    if once is not None:
        runner = sched.JobRunner(sched.inprocess_runner(ctx.db_url, ctx.config, log_level))
        spec = sched.job_by_id(settings, once)
        if once == "reconcile":  # no retry (max_retries 0): exit 75 is the answer
            code = sched.reconcile_and_adjust(runner, spec, ctx.db_url, settings, utcnow())
        else:
            code = runner.run_once(spec)  # no retry: exit 75 is the answer
        # sys.exit, not ctx.exit: click's non-standalone main would return the code, not exit with it
        sys.exit(code)

    now = utcnow()
    catch_up: list[str] = []
    if catch_up_on_start:
        try:
            facts = sched.read_facts(ctx.engine)
        except Exception as exc:
            log.warning("schedule.catch_up.unknown", error=f"{type(exc).__name__}: {exc}")
            facts = sched.Facts(None, frozenset())
        finally:
            ctx.close()  # the scheduler itself holds no database connection between runs
        catch_up = sched.catch_up_jobs(settings, facts, now)
    scheduler = sched.make_scheduler(settings)
    runner = sched.JobRunner(
        sched.subprocess_runner(ctx.db_url, ctx.config, log_level),
        max_retries=sched.lock_retries(settings),
        stopping=scheduler.stopping,
    )
    reconcile = sched.ReconcileJob(runner, ctx.db_url, settings)
    sched.install(scheduler, settings, runner, catch_up=catch_up, now=now, reconcile=reconcile)
    log.info(
        "schedule.start",
        timezone=settings.timezone,
        nightly_at=settings.nightly_at.isoformat("minutes"),
        month_end_day=settings.month_end_day,
        month_end_at=settings.month_end_at.isoformat("minutes"),
        reconcile_at=settings.reconcile_at.isoformat("minutes") if settings.reconcile_months else None,
        catch_up=catch_up,
    )
    sched.run_scheduler(scheduler)


@click.command("metrics")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Write to this file atomically (e.g. node_exporter's textfile folder) instead of stdout.",
)
@click.pass_obj
def metrics(ctx: Context, output: str | None) -> None:
    """Print the jobs' Prometheus metrics, computed from the run records.

    \b
    Per job (label billing_job = nightly | month-end):
      billing_job_last_run_seconds, billing_job_last_run_timestamp_seconds,
      billing_job_last_status{status}, billing_job_last_success_timestamp_seconds,
      billing_job_rows_charged{charge_type}, billing_job_amount_credits{kind},
      billing_job_rejects (the last three: of the last successful run).

    Text exposition format on stdout, so a cron line or a textfile collector
    can use it as is. Amounts are exact in the database; they become floats only
    in this output. A database without the jobs' tables prints no samples.
    """
    from billing_jobs import metrics as m

    registry = m.build_registry(m.read_job_metrics(ctx.engine))
    if output:
        m.write_textfile(output, registry)
    else:
        sys.stdout.write(m.render(registry))
        sys.stdout.flush()


COMMANDS: list[click.Command] = [schedule, metrics]
