"""billing_jobs: the platform's nightly and month-end billing jobs."""

__version__ = "0.1.0"
