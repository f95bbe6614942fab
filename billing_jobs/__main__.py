"""`python -m billing_jobs`: the same command line as the `billing-jobs` script."""

from billing_jobs.cli import main

if __name__ == "__main__":  # worker processes import this module too; only the command runs it
    main()
