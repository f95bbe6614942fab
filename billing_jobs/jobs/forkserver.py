"""The first module the fork server of the worker pools imports (`workers.PRELOAD`).

The fork server forks every worker of the run's pools; it ends the moment the run
that started it ends (SIGKILL from the kernel, `lifeline`), and its workers, which
ask the same of it, end with it. Imported anywhere else it does nothing: only a
process started inside `lifeline.parent_variable` finds its parent named.
"""

import signal

from billing_jobs import lifeline

lifeline.die_with_named_parent(signal.SIGKILL)
