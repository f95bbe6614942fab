"""Fault injection: a run that kills itself (SIGKILL) at a chosen write point.

For crash tests and drills only; off unless one of these variables is set (see
`docs/fault-injection.md`):

- `BILLING_FAULT_KILL_AFTER_WRITE=k`: SIGKILL right after the k-th write transaction
  of the process committed.
- `BILLING_FAULT_KILL_IN_WRITE=k`: SIGKILL inside the k-th write transaction, after
  its work and before its commit (the database rolls it back).
- `BILLING_FAULT_KILL_JOB=J`: only runs of job `J` (`nightly`, `month-end`) are killed.
- `BILLING_FAULT_KILL_PROCESS=run|worker|run-by-worker`: which processes count and
  die (default `run`, the process that started the run; `worker`: each worker
  process of `--workers N`, counting its own writes from 1; `run-by-worker`: each
  worker counts its own writes, and the first to reach k kills the run's process,
  not itself, and goes on: the run's process killed while its workers write).
- `BILLING_FAULT_STOP_BEFORE_WRITE=k`: the counting processes stop themselves
  (SIGSTOP) just before their k-th write transaction, after the reads and rules of
  its chunk; SIGCONT resumes them.
- `BILLING_FAULT_ORPHANS=keep`: the run's worker processes and their fork server do
  not ask for the parent-death signal (as where the kernel has none), so that only
  the check before each chunk and the fencing of each write stop them.
- `BILLING_FAULT_KILL_IN_MIGRATION=R`: `db upgrade` dies inside migration R, before its
  transaction commits (`in_migration`).
- `BILLING_FAULT_TRACE=FILE`: append one line per committed write point to FILE,
  `<pid> <process> <job> <k> <label>`, in any process (counting mode: a run with
  only this set shows every write point it has).

Write points, in the order a run makes them: `run.start` (its run record), `lock.acquire`,
every `Run.write` (labelled with the function that writes), then `run.end` and
`lock.release` (also on a failed or locked run). The lease renewal that PostgreSQL
commits on its own at the start of each `Run.write` is part of that write point.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Any

RUN, WORKER, RUN_BY_WORKER = "run", "worker", "run-by-worker"
_VARIABLES = (
    "BILLING_FAULT_KILL_AFTER_WRITE",
    "BILLING_FAULT_KILL_IN_WRITE",
    "BILLING_FAULT_STOP_BEFORE_WRITE",
    "BILLING_FAULT_ORPHANS",
    "BILLING_FAULT_TRACE",
)


@dataclass(frozen=True)
class FaultPlan:
    """Where a run dies, read once from the environment when it starts (picklable)."""

    job: str
    kill_after: int | None
    kill_in: int | None
    process: str  # run | worker | run-by-worker: which processes count towards the kill
    trace: str | None
    stop_before: int | None = None
    keep_orphans: bool = False


def plan_for(job: str) -> FaultPlan | None:
    """The fault plan of a run of `job`, or None (the usual case: nothing set)."""
    env = os.environ
    if not any(env.get(name) for name in _VARIABLES):
        return None
    target = env.get("BILLING_FAULT_KILL_JOB") or job
    armed = target == job

    def number(name: str) -> int | None:
        text = (env.get(name) or "").strip()
        if text and not text.isdigit():
            raise ValueError(f"{name} must be a whole number of writes, not {text!r}")
        return int(text) if armed and text else None

    return FaultPlan(
        job=job,
        kill_after=number("BILLING_FAULT_KILL_AFTER_WRITE"),
        kill_in=number("BILLING_FAULT_KILL_IN_WRITE"),
        process=env.get("BILLING_FAULT_KILL_PROCESS") or RUN,
        trace=env.get("BILLING_FAULT_TRACE") or None,
        stop_before=number("BILLING_FAULT_STOP_BEFORE_WRITE"),
        keep_orphans=armed and env.get("BILLING_FAULT_ORPHANS") == "keep",
    )


class Faults:
    """One process's count of its write points under a plan."""

    def __init__(self, plan: FaultPlan, process: str = RUN, run_pid: int | None = None) -> None:
        self.plan = plan
        self.process = process
        self.seen = 0
        self._counts = plan.process == process or (plan.process == RUN_BY_WORKER and process == WORKER)
        # run-by-worker: the process a worker kills instead of itself (the run's)
        self._victim = run_pid if plan.process == RUN_BY_WORKER else None

    def before_write(self, label: str) -> None:
        """Before a write transaction begins (the chunk's reads and rules are done)."""
        if self._counts and self.plan.stop_before == self.seen + 1:
            os.kill(os.getpid(), signal.SIGSTOP)

    def before_commit(self, label: str) -> None:
        """Inside a write transaction (or just before one that writes a single row)."""
        if self._counts and self.plan.kill_in == self.seen + 1:
            _die(self._victim)

    def committed(self, label: str) -> None:
        self.seen += 1
        if self.plan.trace:
            line = f"{os.getpid()} {self.process} {self.plan.job} {self.seen} {label}\n"
            with open(self.plan.trace, "a", encoding="utf-8") as out:
                out.write(line)
        if self._counts and self.plan.kill_after == self.seen:
            _die(self._victim)


def label_of(work: Any) -> str:
    """A write point's label: the name of the function that writes (`partial`s unwrapped)."""
    inner = getattr(work, "func", work)
    return str(getattr(inner, "__qualname__", type(inner).__name__)).replace(".<locals>.", ".")


def _die(victim: int | None = None) -> None:
    os.kill(os.getpid() if victim is None else victim, signal.SIGKILL)


MIGRATION_VARIABLE = "BILLING_FAULT_KILL_IN_MIGRATION"


def in_migration(revision: str) -> None:
    """`BILLING_FAULT_KILL_IN_MIGRATION=R`: SIGKILL inside migration R after its data is
    moved, before its transaction commits (the database rolls the migration back)."""
    if os.environ.get(MIGRATION_VARIABLE) == revision:
        _die()
