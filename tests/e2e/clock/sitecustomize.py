"""Drives the clock of every Python process started with this folder on PYTHONPATH.

Process tests set `BILLING_TEST_CLOCK` to an ISO instant; this module (imported
by Python at start-up as `sitecustomize`) starts a ticking `time_machine` travel
there, so the scheduler and every job it starts as a child process see the same
moving clock, whatever the real date is.
"""

import os

_instant = os.environ.get("BILLING_TEST_CLOCK")
if _instant:
    import time_machine

    time_machine.travel(_instant, tick=True).start()
