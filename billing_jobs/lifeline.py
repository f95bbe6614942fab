"""Processes that end with the process that started them.

A run's worker processes, the fork server that forks them, and the runs that
`billing-jobs schedule` starts must not outlive their parent, however it ends
(SIGKILL and the OOM killer included: no code of the parent runs then). Linux's
parent-death signal (`prctl(PR_SET_PDEATHSIG)`) does it in the kernel: the child
asks, once, to receive a signal when its parent ends, and gets it even while it is
stopped or busy in C code.

Two things to know about it:

- The signal is sent when the *thread* that started the child ends, not the
  process. The scheduler's runs are started by a thread that waits for them
  (`subprocess.run`). The fork server serves every pool of its process for as long
  as the process lives, so it is tied only when the main thread starts it (a
  command's job runs there); started from another thread it is not, and its
  workers keep the check before each chunk and the fencing of each write.
- A parent that dies before the child has asked leaves it orphaned at once: the
  child compares its parent's pid after asking (`die_with_parent`), and if its
  parent has already changed, sends itself the signal.

The fork server of the worker pools is started by `multiprocessing`, not by this
code: it is told who its parent is through `PARENT_VARIABLE`, set while it starts
(`parent_variable`), and asks for the signal when it imports `billing_jobs.jobs.forkserver`.

Nothing here imports more than the standard library: the command line imports it
before anything else.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

# The pid of the process that started this one, for a child to die with it.
PARENT_VARIABLE = "BILLING_JOBS_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel for `sig` when this process's parent ends. If the parent ended
    already (before the request took effect), `sig` comes at once. Returns False
    where the kernel cannot do it (not Linux); then the caller's other checks remain."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the parent died between the two calls
        os.kill(os.getpid(), sig)
    return True


def die_with_named_parent(sig: int) -> bool:
    """`die_with_parent(sig)` when `PARENT_VARIABLE` names this process's parent (the
    scheduler that started a run, a run that started a fork server). When it names a
    process that is no longer the parent, that parent has died already: `sig` now.
    Returns whether the variable was set."""
    named = os.environ.pop(PARENT_VARIABLE, "")  # for this process alone, not its children
    if not named.isdigit():
        return False
    if int(named) != os.getppid():
        os.kill(os.getpid(), sig)
        return True
    die_with_parent(sig)
    return True


@contextmanager
def parent_variable(environ: dict[str, str] | os._Environ[str] = os.environ) -> Iterator[None]:
    """`PARENT_VARIABLE` set to this process's pid in `environ` for the duration (the
    environment a child started inside the block inherits), then as it was."""
    before = environ.get(PARENT_VARIABLE)
    environ[PARENT_VARIABLE] = str(os.getpid())
    try:
        yield
    finally:
        if before is None:
            environ.pop(PARENT_VARIABLE, None)
        else:
            environ[PARENT_VARIABLE] = before
