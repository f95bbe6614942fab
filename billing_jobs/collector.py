"""The cyclic garbage collector, told what lives as long as the process.

A chunk makes millions of short-lived container objects (the driver's row tuples
above all). Every few hundred of them CPython runs a collection of the youngest
generation, and every hundred of those a full one, which traverses every tracked
object of the process: the modules' functions, classes and constants too, hundreds
of thousands of them once pandas, numpy and SQLAlchemy are imported. `gc.freeze()`
moves the objects alive at that moment to a permanent generation that collections
skip. What is frozen is never collected as a cycle; the imported modules never are
anyway, and objects freed by their reference counts are freed as before.

A re-close of the benchmark's 100k projects on PostgreSQL in one process spent
0.6-0.7 s of about 11 s in 13 full collections; frozen after the imports, 0.11 s
(`docs/performance.md`).
"""

from __future__ import annotations

import gc
from functools import cache


@cache
def freeze_long_lived() -> None:
    """Freeze every object alive now, once per process: call it when the process has
    imported what it runs (a job's process when its first run starts, the fork server
    after its preloads). A collection first, so that no garbage is frozen with them;
    once only, so that a long-lived process (the scheduler) freezes nothing of one run
    for good at the start of the next."""
    gc.collect()
    gc.freeze()
