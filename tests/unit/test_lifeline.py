"""`lifeline`: a child process that ends with its parent, real processes on this kernel."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from billing_jobs import lifeline

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a signal of Linux's")

# A parent (python) that starts a child asking to die with it, prints the child's pid, sleeps.
PARENT = """
import os, subprocess, sys, time
from billing_jobs import lifeline
env = dict(os.environ, **{lifeline.PARENT_VARIABLE: str(os.getpid())})
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], env=env)
print(child.pid, flush=True)
time.sleep(600)
"""
CHILD = """
import signal, time
from billing_jobs import lifeline
assert lifeline.die_with_named_parent(signal.SIGTERM)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_a_child_that_named_its_parent_ends_when_the_parent_is_killed() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        time.sleep(1.0)  # the child has started and asked
        assert _alive(child)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _alive(child), "the child outlived its parent"
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()


def test_a_child_whose_named_parent_is_gone_already_gets_the_signal_at_once() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    env = dict(os.environ, **{lifeline.PARENT_VARIABLE: str(gone.pid)})
    child = subprocess.run([sys.executable, "-c", CHILD], env=env, timeout=60, check=False)
    assert child.returncode == -signal.SIGTERM


def test_without_the_variable_nothing_is_asked_and_the_variable_is_not_passed_on() -> None:
    script = (
        "import os, signal; from billing_jobs import lifeline; "
        "print(lifeline.die_with_named_parent(signal.SIGTERM), lifeline.PARENT_VARIABLE in os.environ)"
    )
    env = {k: v for k, v in os.environ.items() if k != lifeline.PARENT_VARIABLE}
    bare = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert bare.stdout.split() == ["False", "False"]
    env[lifeline.PARENT_VARIABLE] = str(os.getpid())
    named = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert named.stdout.split() == ["True", "False"]  # asked; its own children do not inherit it


def test_the_parent_variable_is_set_inside_the_block_only() -> None:
    environ: dict[str, str] = {}
    with lifeline.parent_variable(environ):
        assert environ == {lifeline.PARENT_VARIABLE: str(os.getpid())}
    assert environ == {}
    environ[lifeline.PARENT_VARIABLE] = "1"
    with lifeline.parent_variable(environ):
        assert environ[lifeline.PARENT_VARIABLE] == str(os.getpid())
    assert environ == {lifeline.PARENT_VARIABLE: "1"}
