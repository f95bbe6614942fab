"""`python -m billing_jobs`: the same command line as the `billing-jobs` script."""

from billing_jobs.cli import main

main()
