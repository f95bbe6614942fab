"""Defaults the command line shows in its help, kept apart from the modules that use
them so that `--help` imports nothing heavy."""

DEFAULT_DB_URL = "sqlite:///billing.db"
JOBS = ("nightly", "month-end", "reconcile")  # the jobs whose runs `runs` and `status` show
