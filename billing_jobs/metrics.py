"""Prometheus metrics of the billing jobs, computed from `billing_runs`.

Every number comes from the run records, never from process memory, so the
metrics after a run, the `billing-jobs metrics` command and a restarted
scheduler all show the same thing, and a failed run does not erase the time of
the last success. The metrics live in a dedicated `CollectorRegistry` (nothing
of the process default registry: no `process_*` or `python_*` noise).

Metrics, one series per job (label `billing_job`: `nightly`, `month-end`):

- `billing_job_last_run_seconds`: how long the last finished run took (start of
  its record to its end, lock wait included);
- `billing_job_last_run_timestamp_seconds`: when the last finished run ended;
- `billing_job_last_status{status}`: 1 for the status of the last finished run
  (`succeeded`, `failed`, `locked`), 0 for the others;
- `billing_job_last_success_timestamp_seconds`: when the last successful run
  ended (the one to alert on: `time() - ... > 26 * 3600` for the nightly);
- `billing_job_rows_charged{charge_type}`: charges the last successful run
  computed, `storage_fee` and `cloud`;
- `billing_job_amount_credits{kind}`: their amounts in credits, `storage_fee`,
  `cloud` and `storage_refund` (month-end only);
- `billing_job_rejects`: rejected source rows the last successful run met.

Amounts are exact integer units of 1/10,000 credit in the database and in the
run records; they become a binary float only here, at the exposition edge,
because Prometheus samples are float64. A float64 holds every amount below
about 9 * 10^11 credits to the last 1/10,000, far beyond what one run bills.

Why the label is `billing_job` and not `job`: Prometheus attaches its own `job`
label to every scraped series (a `job` label in a node_exporter textfile turns
into `exported_job`), and the Pushgateway overwrites a pushed `job` label with
the job of the push URL. So pushes go to job `billing_jobs` with the grouping
key `billing_job=<job>`: each job replaces only its own group, and the nightly
push never wipes the month-end metrics.

Publishing (`publish_after_run`, called by `jobs.runner.run_job` after every
run that writes): the textfile for node_exporter's textfile collector when
`[monitoring] metrics_textfile` is set (written to a temporary file, then
renamed: a scrape never sees half a file), and a push to the Pushgateway when
`[monitoring] pushgateway_url` is set. Monitoring never fails a run: a failed
write or push is logged as a warning.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest, push_to_gateway, write_to_textfile
from sqlalchemy import Engine, inspect, select

from billing_jobs.db.billing_tables import billing_runs
from billing_jobs.jobs.status import run_counts as _counts
from billing_jobs.logs import get_logger
from billing_jobs.rules.money import UNITS_PER_CREDIT
from billing_jobs.settings import Settings

JOB_LABEL = "billing_job"
PUSH_JOB = "billing_jobs"
PUSH_TIMEOUT_SECONDS = 10.0
STATUSES = ("succeeded", "failed", "locked")
# (label value, count key in billing_runs.counts)
ROWS_CHARGED = (("storage_fee", "storage_charges"), ("cloud", "cloud_charges"))
AMOUNTS = (("storage_fee", "storage_units"), ("cloud", "cloud_units"), ("storage_refund", "refund_units"))


@dataclass(frozen=True)
class JobMetrics:
    """What the metrics say about one job, read from its run records."""

    job: str
    last_status: str | None = None
    last_run_seconds: float | None = None
    last_run_finished_at: datetime | None = None  # naive UTC
    last_success_at: datetime | None = None  # naive UTC
    success_counts: dict[str, Any] = field(default_factory=dict)


def _timestamp(naive_utc: datetime) -> float:
    return naive_utc.replace(tzinfo=UTC).timestamp()


def read_job_metrics(engine: Engine, jobs: Iterable[str] | None = None) -> list[JobMetrics]:
    """The metrics of every job with finished runs (or of `jobs`), from `billing_runs`.

    A run still `running` is left out: it has no end yet (and one whose process
    died stays `running`; the success timestamp going stale shows that).
    """
    if "billing_runs" not in inspect(engine).get_table_names():
        return []
    r = billing_runs
    wanted = list(jobs) if jobs is not None else None
    query = select(r.c.job, r.c.status, r.c.started_at, r.c.finished_at, r.c.counts).where(
        r.c.status.in_(STATUSES), r.c.finished_at.is_not(None)
    )
    if wanted is not None:
        query = query.where(r.c.job.in_(wanted))
    last: dict[str, Any] = {}
    last_success: dict[str, Any] = {}
    with engine.connect() as conn:
        # Newest first; the first row seen per job wins. One pass, no per-job queries.
        for row in conn.execute(query.order_by(r.c.finished_at.desc(), r.c.started_at.desc())):
            last.setdefault(row.job, row)
            if row.status == "succeeded":
                last_success.setdefault(row.job, row)
    out = []
    for job in sorted(last):
        run, ok = last[job], last_success.get(job)
        out.append(
            JobMetrics(
                job=job,
                last_status=run.status,
                last_run_seconds=max((run.finished_at - run.started_at).total_seconds(), 0.0),
                last_run_finished_at=run.finished_at,
                last_success_at=ok.finished_at if ok is not None else None,
                success_counts=_counts(ok.counts) if ok is not None else {},
            )
        )
    return out


def build_registry(jobs: Iterable[JobMetrics]) -> CollectorRegistry:
    """A fresh registry holding the metrics of `jobs` (pure: no I/O)."""
    registry = CollectorRegistry(auto_describe=True)
    seconds = Gauge(
        "billing_job_last_run_seconds",
        "Duration of the last finished run of the job, in seconds.",
        [JOB_LABEL],
        registry=registry,
    )
    finished = Gauge(
        "billing_job_last_run_timestamp_seconds",
        "Unix time when the last finished run of the job ended.",
        [JOB_LABEL],
        registry=registry,
    )
    status = Gauge(
        "billing_job_last_status",
        "1 for the status of the last finished run of the job (succeeded, failed, locked), else 0.",
        [JOB_LABEL, "status"],
        registry=registry,
    )
    success = Gauge(
        "billing_job_last_success_timestamp_seconds",
        "Unix time when the last successful run of the job ended.",
        [JOB_LABEL],
        registry=registry,
    )
    rows = Gauge(
        "billing_job_rows_charged",
        "Charges computed by the last successful run of the job, per charge type.",
        [JOB_LABEL, "charge_type"],
        registry=registry,
    )
    amounts = Gauge(
        "billing_job_amount_credits",
        "Credits charged (or refunded, negative) by the last successful run of the job, per kind.",
        [JOB_LABEL, "kind"],
        registry=registry,
    )
    rejects = Gauge(
        "billing_job_rejects",
        "Rejected source rows the last successful run of the job met.",
        [JOB_LABEL],
        registry=registry,
    )
    for m in jobs:
        if m.last_status is not None:
            for name in STATUSES:
                status.labels(m.job, name).set(1 if m.last_status == name else 0)
        if m.last_run_seconds is not None:
            seconds.labels(m.job).set(m.last_run_seconds)
        if m.last_run_finished_at is not None:
            finished.labels(m.job).set(_timestamp(m.last_run_finished_at))
        if m.last_success_at is None:
            continue
        success.labels(m.job).set(_timestamp(m.last_success_at))
        counts = m.success_counts
        for label, key in ROWS_CHARGED:
            rows.labels(m.job, label).set(int(counts.get(key, 0)))
        for label, key in AMOUNTS:
            if key in counts or key != "refund_units":  # refunds: month-end only
                # Exact integer units -> float credits, here at the edge only.
                amounts.labels(m.job, label).set(int(counts.get(key, 0)) / UNITS_PER_CREDIT)
        rejects.labels(m.job).set(int(counts.get("rejects", 0)))
    return registry


def render(registry: CollectorRegistry) -> str:
    """The Prometheus text exposition format of `registry`."""
    return generate_latest(registry).decode("utf-8")


def write_textfile(path: str, registry: CollectorRegistry) -> None:
    """Write atomically (temporary file in the same folder, then rename)."""
    write_to_textfile(path, registry)


def push(url: str, job: str, registry: CollectorRegistry, timeout: float = PUSH_TIMEOUT_SECONDS) -> None:
    """Replace the group `job=billing_jobs, billing_job=<job>` on the Pushgateway."""
    push_to_gateway(url, job=PUSH_JOB, registry=registry, grouping_key={JOB_LABEL: job}, timeout=timeout)


def publish_after_run(engine: Engine, settings: Settings, job: str) -> None:
    """Write the textfile and push, as configured; never raises (monitoring must not fail a run)."""
    if not settings.metrics_textfile and not settings.pushgateway_url:
        return
    log = get_logger(job=job)
    try:
        everything = read_job_metrics(engine)
    except Exception as exc:
        log.warning("metrics.read_failed", error=f"{type(exc).__name__}: {exc}")
        return
    if settings.metrics_textfile:
        try:
            write_textfile(settings.metrics_textfile, build_registry(everything))
            log.info("metrics.textfile_written", path=settings.metrics_textfile)
        except Exception as exc:
            log.warning(
                "metrics.textfile_failed",
                path=settings.metrics_textfile,
                error=f"{type(exc).__name__}: {exc}",
            )
    if settings.pushgateway_url:
        own = [m for m in everything if m.job == job]
        try:
            push(settings.pushgateway_url, job, build_registry(own))
            log.info("metrics.pushed", url=settings.pushgateway_url)
        except Exception as exc:
            log.warning(
                "metrics.push_failed", url=settings.pushgateway_url, error=f"{type(exc).__name__}: {exc}"
            )
