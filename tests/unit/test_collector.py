"""What lives as long as a job's process is frozen out of the cyclic collector: in the
job's own process once, and in the workers, which inherit it from their fork server.
Each check runs in a fresh interpreter, so that nothing of the test run is frozen."""

from __future__ import annotations

import subprocess
import sys

import pytest

from billing_jobs.jobs import workers


def _python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_process_freezes_what_it_holds_once_and_nothing_of_what_comes_after() -> None:
    out = _python(
        "import gc\n"
        "from billing_jobs.collector import freeze_long_lived\n"
        "before = gc.get_freeze_count()\n"
        "import billing_jobs.jobs.month_end\n"
        "freeze_long_lived()\n"
        "frozen = gc.get_freeze_count()\n"
        "later = [[i] for i in range(10_000)]\n"
        "freeze_long_lived()\n"
        "print(before, frozen, gc.get_freeze_count())\n"
    )
    before, frozen, again = (int(n) for n in out.split())
    assert before == 0
    assert frozen > 50_000  # the modules a job runs: pandas, numpy, SQLAlchemy and the jobs'
    assert again == frozen  # once per process: the second run's objects stay collectable


def test_no_garbage_is_frozen() -> None:
    out = _python(
        "import gc, weakref\n"
        "from billing_jobs.collector import freeze_long_lived\n"
        "class Node:\n"
        "    pass\n"
        "a, b = Node(), Node()\n"
        "a.other, b.other = b, a\n"
        "watch = weakref.ref(a)\n"
        "del a, b\n"  # a cycle no one refers to
        "freeze_long_lived()\n"
        "print(watch() is None)\n"
    )
    assert out == "True"  # collected, not frozen for the life of the process


@pytest.mark.skipif(workers.START_METHOD != "forkserver", reason="workers are forked from a fork server")
def test_the_workers_inherit_the_frozen_modules_of_their_fork_server() -> None:
    assert workers.PRELOAD[-1] == "billing_jobs.jobs.preloaded"
    out = _python(
        "import gc, multiprocessing\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from billing_jobs.jobs import workers\n"
        "context = multiprocessing.get_context('forkserver')\n"
        "workers._start_forkserver(context, keep_orphans=True)\n"
        "with ProcessPoolExecutor(1, mp_context=context) as pool:\n"
        "    print(gc.get_freeze_count(), pool.submit(gc.get_freeze_count).result())\n"
    )
    here, worker = (int(n) for n in out.split())
    assert here == 0  # nothing frozen in the process that started the pool ...
    assert worker > 50_000  # ... while its workers hold their server's modules frozen
