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

No worker outlives its run (`docs/locks.md`): the fork server and each worker ask
the kernel for SIGKILL when their parent ends (`lifeline`), so a run killed with
SIGKILL takes its workers with it at once; a worker checks that the run's process
lives before each chunk and after a failed one; and a run that fails or is stopped
kills its workers before it records the failure, instead of waiting for the chunks
in flight.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from billing_jobs import lifeline, logs
from billing_jobs.db.engine import make_engine
from billing_jobs.db.lock import Lease, process_alive, process_key
from billing_jobs.db.sql import Chunk
from billing_jobs.faults import WORKER, FaultPlan, Faults
from billing_jobs.jobs.runner import Run
from billing_jobs.settings import Settings

T = TypeVar("T")

# A fresh server process forks the workers: nothing of this process (its database
# connections above all) reaches them, and the modules are imported once, not per worker.
START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
# `jobs.forkserver` first: the fork server ends with the run before it imports the rest.
PRELOAD = [
    "billing_jobs.jobs.forkserver",
    "billing_jobs.jobs.month_end",
    "billing_jobs.jobs.nightly",
    "billing_jobs.jobs.ledger",
    "billing_jobs.jobs.preloaded",  # last: what the others made, frozen for the workers
]


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
    parent: tuple[str, int, str | None] = ("", 0, None)  # the run's process: host, pid, process_key

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
            parent=(socket.gethostname(), os.getpid(), process_key(os.getpid())),
        )

    def run_alive(self) -> bool:
        """Whether the run's process still lives (True where this host cannot tell)."""
        return process_alive(*self.parent) is not False


_worker_run: Run | None = None
_worker_spec: RunSpec | None = None


def _orphaned() -> None:
    """The run's process is gone: nobody waits for this worker's results. End now."""
    os.kill(os.getpid(), signal.SIGKILL)


def _start_worker(spec: RunSpec, write_turn: Any) -> None:
    global _worker_run, _worker_spec  # noqa: PLW0603  # one run per worker process, set once at its start
    if spec.faults is None or not spec.faults.keep_orphans:
        lifeline.die_with_parent(signal.SIGKILL)  # the fork server, which dies with the run
    if not spec.run_alive():
        _orphaned()
    _worker_spec = spec
    level, as_json = spec.log
    logs.configure(level, json=as_json)  # the run's logs, on stderr as the run's own
    engine = make_engine(spec.db_url)
    lease = None if spec.lease is None else Lease(engine, *spec.lease)
    faults = None if spec.faults is None else Faults(spec.faults, WORKER, run_pid=spec.parent[1])
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
    run, spec = _worker_run, _worker_spec
    assert run is not None, "the pool's initializer made the worker's run"
    assert spec is not None
    if not spec.run_alive():
        _orphaned()
    run.counts = {}
    run.clear_rejects()
    try:
        result = work(run, chunk, **kwargs)
    except BaseException:
        if not spec.run_alive():  # e.g. its writes were fenced off: the run is gone
            _orphaned()
        raise
    return result, dict(run.counts), run.reject_keys()


def can_share(run: Run) -> bool:
    """Whether other processes can open the run's database (not an in-memory SQLite)."""
    url = run.engine.url
    return not (url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"))


def warm_up(run: Run, workers: int) -> None:
    """Start the fork server of the run's pools now, when its chunks will run on worker
    processes: the server loads the jobs' modules (`PRELOAD`) while the job plans its
    chunks, instead of after. `run_chunks` starts it otherwise (once per process)."""
    if workers > 1 and can_share(run) and START_METHOD == "forkserver":
        keep_orphans = run.faults is not None and run.faults.plan.keep_orphans
        _start_forkserver(multiprocessing.get_context(START_METHOD), keep_orphans=keep_orphans)


def run_chunks(
    run: Run,
    work: Callable[..., T],
    chunks: Sequence[Chunk],
    workers: int,
    *,
    each: Mapping[int, Mapping[str, Any]] | None = None,
    **kwargs: Any,
) -> Iterator[T]:
    """`work(run, chunk, **kwargs)` for every chunk, in chunk order, on `workers` processes.

    each: more keyword arguments for one chunk only (by its index): its own slice of
    data, sent to the worker that runs it and to no other.
    With one worker (or one chunk) everything runs in this process.
    """
    mine = each or {}
    if workers <= 1 or len(chunks) <= 1 or not can_share(run):
        for chunk in chunks:
            yield work(run, chunk, **kwargs, **mine.get(chunk.index, {}))
        return
    context = multiprocessing.get_context(START_METHOD)
    spec = RunSpec.of(run)
    if START_METHOD == "forkserver":
        _start_forkserver(context, keep_orphans=spec.faults is not None and spec.faults.keep_orphans)
    write_turn = context.Lock() if run.engine.dialect.name == "sqlite" else None
    with ProcessPoolExecutor(
        max_workers=min(workers, len(chunks)),
        mp_context=context,
        initializer=_start_worker,
        initargs=(spec, write_turn),
    ) as pool:
        futures: list[Future[tuple[T, dict[str, Any], set[tuple[str, str, str]]]]] = []
        try:
            futures.extend(
                pool.submit(_in_worker, work, chunk, {**kwargs, **mine.get(chunk.index, {})})
                for chunk in chunks
            )
            for future in futures:
                result, counts, rejected = future.result()
                for key, value in counts.items():
                    if key != "rejects":
                        run.count(key, value)
                run.add_reject_keys(rejected)
                yield result
        except BaseException:  # a failed chunk, SIGTERM, a lost lock, the caller gone
            # Killed workers break the pool, which fails every chunk not done. (Cancelling
            # them as well makes Python 3.11's pool thread fail on a cancelled future.)
            if not _kill_workers(pool):
                for future in futures:
                    future.cancel()
            raise


def _start_forkserver(context: Any, *, keep_orphans: bool) -> None:
    """The fork server of this process's pools, started (once per process) knowing its
    parent, so that it ends with this process (`jobs.forkserver`)."""
    from multiprocessing import forkserver

    context.set_forkserver_preload(PRELOAD)
    # The parent-death signal follows the thread that starts the server, and the server
    # serves the whole process: only the main thread's end is the process's end. Pools
    # started from other threads (tests, an in-process scheduler) keep the other guards.
    tied = not keep_orphans and threading.current_thread() is threading.main_thread()
    with lifeline.parent_variable() if tied else nullcontext():
        forkserver.ensure_running()


def _kill_workers(pool: ProcessPoolExecutor) -> int:
    """SIGKILL the pool's workers: a chunk in flight rolls back, and nothing of a run
    that is ending goes on computing or writing after it. How many were killed."""
    processes = getattr(pool, "_processes", None) or {}
    alive = [process for process in list(processes.values()) if process.is_alive()]
    for process in alive:
        process.kill()
    return len(alive)
