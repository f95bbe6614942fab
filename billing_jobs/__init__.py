"""billing_jobs: the platform's nightly and month-end billing jobs."""

import pandas as _pd

# Strings in data frames are held by Python, whatever else is installed: with pyarrow
# present (for Parquet exports) pandas would otherwise keep every string column in
# Arrow memory, a different memory and speed profile from the one measured and tested.
_pd.set_option("mode.string_storage", "python")

__version__ = "0.1.0"
