"""pandas as the jobs use it: every module that makes data frames imports `pd` from
here, never pandas itself, so the option below holds before the first frame is made.

Strings in data frames are held by Python, whatever else is installed: with pyarrow
present (for Parquet exports) pandas would otherwise keep every string column in
Arrow memory, a different memory and speed profile from the one measured and tested.

Importing the package or its command line does not import pandas (start-up time of
`billing-jobs --help`, `status`, `runs`); the commands that compute import it.
"""

import pandas as pd

pd.set_option("mode.string_storage", "python")

__all__ = ["pd"]
