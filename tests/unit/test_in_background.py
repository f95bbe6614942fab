"""`InBackground`: a job's side read runs on its own thread; its result or its error
reaches the job's thread, and a failed run does not wait for it."""

from __future__ import annotations

import threading

import pandas as pd
import pytest

from billing_jobs.jobs.compute import InBackground


def test_the_result_is_what_the_work_returned_computed_on_another_thread() -> None:
    seen: list[str] = []

    def work() -> pd.DataFrame:
        seen.append(threading.current_thread().name)
        return pd.DataFrame({"n": [1, 2]})

    assert InBackground(work).result()["n"].tolist() == [1, 2]
    assert seen == ["billing-side-read"]


def test_an_error_of_the_work_is_raised_by_result_in_the_callers_thread() -> None:
    def work() -> pd.DataFrame:
        raise RuntimeError("the scan failed")

    side = InBackground(work)
    with pytest.raises(RuntimeError, match="the scan failed"):
        side.result()


def test_the_thread_is_a_daemon_so_a_failed_run_does_not_wait_for_it() -> None:
    release = threading.Event()

    def work() -> pd.DataFrame:
        release.wait(5)
        return pd.DataFrame()

    side = InBackground(work)
    try:
        assert side._thread.daemon
        assert side._thread.is_alive()
    finally:
        release.set()
    assert side.result().empty
