"""Groups of rows that come together: what the reads give (a chunk's usage, a group
after another, each in day order) summed without a sort.

Pure functions over numpy arrays.
"""

from __future__ import annotations

import numpy as np

from billing_jobs.frames import pd


def together(keys: tuple[np.ndarray, ...], day: np.ndarray) -> np.ndarray | None:
    """The first row of each group of rows with equal keys, when every group's rows are
    already together and in increasing day order (as the reads give a chunk's usage,
    a group after another); None when they are not. Then no sort of the rows is
    needed: a check of each row against the one before, and of the groups' keys
    (one row per group) for a group that comes back later."""
    start = np.ones(len(day), dtype=bool)
    start[1:] = False
    for key in keys:
        start[1:] |= key[1:] != key[:-1]
    if not bool((start[1:] | (day[1:] > day[:-1])).all()):
        return None
    first = np.flatnonzero(start)
    if not pd.MultiIndex.from_arrays([key[first] for key in keys]).is_unique:
        return None
    return first


def sums_together(
    keys: tuple[np.ndarray, ...], day: np.ndarray, values: tuple[np.ndarray, ...]
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]] | None:
    """Per group of `together` rows: the first row's index, the number of rows, and each
    of `values` summed (integers); None when the groups' rows are not together."""
    first = together(keys, day)
    if first is None:
        return None
    if not len(first):
        return first, first, [v[:0] for v in values]
    rows = np.diff(np.append(first, len(day)))
    return first, rows, [np.add.reduceat(v, first) for v in values]
