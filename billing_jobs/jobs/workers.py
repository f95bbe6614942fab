"""Chunks run by a pool of worker processes, each with its own database connection.

A chunk's work is one pipeline (read -> rules -> exact diff -> write) that needs
nothing but the chunk and the run, so a worker runs it alone. Workers are forked by
a fresh `forkserver` process (no database connection of the parent is ever shared
with a child) and each makes its own engine. On PostgreSQL the workers write at the same time,
each chunk in its own transaction; on SQLite, which has one writer per database,
they read and compute in parallel and take turns to write (a lock held for the
write transaction only). Every write transaction still proves the run's writer
lock is held, so a worker of a run that lost its lock cannot commit.

Results come back in chunk order, so a run's output does not depend on which
worker finished first; counts and rejects seen are merged into the parent's run.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from billing_jobs import logs
from billing_jobs.db.engine import make_engine
from billing_jobs.db.lock import Lease
from billing_jobs.db.reads import Chunk
from billing_jobs.faults import WORKER, FaultPlan, Faults
from billing_jobs.jobs.runner import Run
from billing_jobs.settings import Settings

T = TypeVar("T")

# A fresh server process forks the workers: nothing of this process (its database
# connections above all) reaches them, and the modules are imported once, not per worker.
START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
PRELOAD = ["billing_jobs.jobs.month_end", "billing_jobs.jobs.nightly", "billing_jobs.jobs.ledger"]


def default_workers() -> int:
    """The number of CPUs this process may use."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return max(os.cpu_count() or 1, 1)


@dataclass(frozen=True)
class RunSpec:
    """What a worker needs to act as the run: picklable, no connection in it."""

    db_url: str = field(repr=False)  # may carry the database password
    settings: Settings
    run_id: str
    now: datetime
    dry_run: bool
    lease: tuple[str, str, str, int, int, int | None] | None  # see Lease.spec
    faults: FaultPlan | None = None  # fault injection: each worker counts its own writes
    log: tuple[str, bool] = ("INFO", True)  # the run's log level and format (JSON or not)

    @classmethod
    def of(cls, run: Run) -> RunSpec:
        lease = run.lease
        return cls(
            db_url=run.engine.url.render_as_string(hide_password=False),
            settings=run.settings,
            run_id=run.run_id,
            now=run.now,
            dry_run=run.dry_run,
            lease=None if lease is None else lease.spec(),
            faults=None if run.faults is None else run.faults.plan,
            log=logs.configured(),
        )


_worker_run: Run | None = None


def _start_worker(spec: RunSpec, write_turn: Any) -> None:
    global _worker_run  # noqa: PLW0603  # one run per worker process, set once at its start
    level, as_json = spec.log
    logs.configure(level, json=as_json)  # the run's logs, on stderr as the run's own
    engine = make_engine(spec.db_url)
    lease = None if spec.lease is None else Lease(engine, *spec.lease)
    faults = None if spec.faults is None else Faults(spec.faults, WORKER)
    _worker_run = Run(
        engine,
        spec.settings,
        spec.run_id,
        spec.now,
        spec.dry_run,
        lease,
        write_turn=write_turn,
        faults=faults,
    )


def _in_worker(
    work: Callable[..., T], chunk: Chunk, kwargs: dict[str, Any]
) -> tuple[T, dict[str, Any], set[tuple[str, str, str]]]:
    run = _worker_run
    assert run is not None, "the pool's initializer made the worker's run"
    run.counts = {}
    run.clear_rejects()
    result = work(run, chunk, **kwargs)
    return result, dict(run.counts), run.reject_keys()


def can_share(run: Run) -> bool:
    """Whether other processes can open the run's database (not an in-memory SQLite)."""
    url = run.engine.url
    return not (url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"))


def run_chunks(
    run: Run,
    work: Callable[..., T],
    chunks: Sequence[Chunk],
    workers: int,
    **kwargs: Any,
) -> Iterator[T]:
    """`work(run, chunk, **kwargs)` for every chunk, in chunk order, on `workers` processes.

    With one worker (or one chunk) everything runs in this process.
    """
    if workers <= 1 or len(chunks) <= 1 or not can_share(run):
        for chunk in chunks:
            yield work(run, chunk, **kwargs)
        return
    context = multiprocessing.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        context.set_forkserver_preload(PRELOAD)
    write_turn = context.Lock() if run.engine.dialect.name == "sqlite" else None
    with ProcessPoolExecutor(
        max_workers=min(workers, len(chunks)),
        mp_context=context,
        initializer=_start_worker,
        initargs=(RunSpec.of(run), write_turn),
    ) as pool:
        futures: list[Future[tuple[T, dict[str, Any], set[tuple[str, str, str]]]]] = [
            pool.submit(_in_worker, work, chunk, kwargs) for chunk in chunks
        ]
        try:
            for future in futures:
                result, counts, rejected = future.result()
                for key, value in counts.items():
                    if key != "rejects":
                        run.count(key, value)
                run.add_reject_keys(rejected)
                yield result
        except BaseException:
            for future in futures:
                future.cancel()
            raise
