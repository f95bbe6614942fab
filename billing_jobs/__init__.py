"""billing_jobs: the platform's nightly and month-end billing jobs.

Importing the package imports nothing heavy: pandas comes with `billing_jobs.frames`,
imported by the modules that make data frames.
"""

__version__ = "0.1.0"
