"""The last module the fork server of the worker pools imports (`workers.PRELOAD`).

By then the server holds every module a worker runs, their functions, classes and
constants: objects that live as long as the process. They are frozen out of the
cyclic garbage collector here (`billing_jobs.collector`), so that the workers forked
from the server, which inherit them, never traverse them again: a full collection in
a worker otherwise walked all of them, many times in a chunk that makes millions of
row tuples.
"""

from billing_jobs.collector import freeze_long_lived

freeze_long_lived()
