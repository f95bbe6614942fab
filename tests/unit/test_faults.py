"""The fault-injection hook's plan, read from the environment (the kills themselves are
tested in tests/e2e/test_crash_matrix.py)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest

from billing_jobs.faults import RUN, WORKER, FaultPlan, Faults, label_of, plan_for


def _clear(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "BILLING_FAULT_KILL_AFTER_WRITE",
        "BILLING_FAULT_KILL_IN_WRITE",
        "BILLING_FAULT_KILL_JOB",
        "BILLING_FAULT_KILL_PROCESS",
        "BILLING_FAULT_TRACE",
    ):
        monkeypatch.delenv(name, raising=False)


def test_without_the_variables_a_run_has_no_fault_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear(monkeypatch)
    assert plan_for("nightly") is None
    monkeypatch.setenv("BILLING_FAULT_KILL_JOB", "nightly")  # alone, it kills nothing
    assert plan_for("nightly") is None


def test_the_plan_names_the_write_and_only_for_the_job_named(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear(monkeypatch)
    monkeypatch.setenv("BILLING_FAULT_KILL_AFTER_WRITE", "7")
    monkeypatch.setenv("BILLING_FAULT_KILL_JOB", "month-end")
    assert plan_for("month-end") == FaultPlan("month-end", 7, None, RUN, None)
    assert plan_for("nightly") == FaultPlan("nightly", None, None, RUN, None)
    monkeypatch.setenv("BILLING_FAULT_KILL_AFTER_WRITE", "seven")
    with pytest.raises(ValueError, match="BILLING_FAULT_KILL_AFTER_WRITE must be a whole number"):
        plan_for("month-end")


def test_the_trace_lists_every_write_point_of_the_process(tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    plan = FaultPlan("month-end", kill_after=None, kill_in=None, process=WORKER, trace=str(trace))
    faults = Faults(plan, RUN)  # a run process under a plan for workers: counts, never dies
    for label in ("run.start", "lock.acquire", "_start"):
        faults.before_commit(label)
        faults.committed(label)
    lines = [line.split()[1:] for line in trace.read_text(encoding="utf-8").splitlines()]
    assert lines == [
        ["run", "month-end", "1", "run.start"],
        ["run", "month-end", "2", "lock.acquire"],
        ["run", "month-end", "3", "_start"],
    ]


def _write_chunk(conn: object, *, chunk: int) -> None:
    return None


def _period_writer() -> object:
    def work(conn: object) -> None:
        return None

    return work


def test_a_write_point_is_labelled_with_the_function_that_writes() -> None:
    assert label_of(partial(_write_chunk, chunk=1)) == "_write_chunk"
    assert label_of(_period_writer()) == "_period_writer.work"
