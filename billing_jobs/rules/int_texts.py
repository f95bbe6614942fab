"""Many integers as one text: how the stored month forms (`rules.periods`,
`rules.day_values`) and, on SQLite, the reads' `key value` pairs (`db.reads.day_pairs`)
carry their numbers.

A text is decimal integers (`-?[0-9]+`, within 64 bits) separated by single spaces.
Both directions work on whole columns: a chunk's texts hold millions of numbers,
and a Python call per number is what they would otherwise cost.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np

_INT64 = np.iinfo(np.int64)
_POWERS = np.array([10**k for k in range(1, 20)], dtype=np.uint64)  # 10 .. 10**19
_DIGIT, _SPACE, _MINUS = 1, 2, 3
_CLASSES = np.zeros(256, dtype=np.int8)
_CLASSES[np.frombuffer(b"0123456789", dtype=np.uint8)] = _DIGIT
_CLASSES[ord(" ")] = _SPACE
_CLASSES[ord("-")] = _MINUS


def group_texts(values: np.ndarray, first: np.ndarray) -> list[str]:
    """Rows of integers (a 2-D array, one row per day) as one text per group of
    rows, the groups starting at the indexes `first`: every number of a group in row
    order, separated by single spaces.

    Every number is laid out in a row of bytes (its sign, its digits right-aligned, a
    space), a column of digits at a time in numpy; the bytes each number uses are kept
    in order, decoded once and cut into one text per group: no Python string per
    number."""
    rows, width = values.shape
    flat = np.ascontiguousarray(values, dtype=np.int64).ravel()
    if not len(flat):
        return ["" for _ in range(len(first))]
    negative = flat < 0
    # The magnitude in 64 unsigned bits: -(n + 1) + 1 also holds the smallest int64.
    magnitude = np.where(negative, -(flat + 1), flat).astype(np.uint64) + negative.astype(np.uint64)
    digits = 1 + np.searchsorted(_POWERS, magnitude, side="right")
    places = int(digits.max())
    layout = np.empty((len(flat), places + 2), dtype=np.uint8)
    used = np.empty(layout.shape, dtype=bool)
    layout[:, 0], used[:, 0] = ord("-"), negative
    # 32 bits when every number fits (day offsets, most amounts): a faster division.
    rest = magnitude.astype(np.uint32) if places <= 9 else magnitude.copy()
    for column in range(places, 0, -1):  # the units first
        layout[:, column] = (rest % 10).astype(np.uint8) + ord("0")
        rest //= 10
        used[:, column] = digits > places - column
    layout[:, -1], used[:, -1] = ord(" "), True
    text = layout[used].tobytes().decode("ascii")
    # Where each group's first number starts in the text, and where the next one's does.
    at = np.append(0, np.cumsum(digits + negative + 1))[np.append(first, rows) * width].tolist()
    return [text[a : b - 1] for a, b in pairwise(at)]


def integers(text: str) -> np.ndarray:
    """The integers of a text of decimal integers separated by single spaces (int64).

    Raises ValueError for anything else: another character, a space at either end or
    two together, a sign not at a number's start, a number beyond 64 bits. The text is
    checked byte by byte in numpy, then parsed in C (`numpy.fromstring`), not split
    into a Python string per number.
    """
    if not text:
        return np.empty(0, dtype=np.int64)
    try:
        raw = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    except UnicodeEncodeError:
        raise ValueError("not a text of integers: a character other than digits, '-' and spaces") from None
    kind = _CLASSES[raw]
    if not kind.all():
        raise ValueError("not a text of integers: a character other than digits, '-' and spaces")
    space = kind == _SPACE
    minus = kind == _MINUS
    after_space = np.empty(len(kind), dtype=bool)  # a number starts here
    after_space[0], after_space[1:] = True, space[:-1]
    before_digit = np.empty(len(kind), dtype=bool)
    before_digit[-1], before_digit[:-1] = False, kind[1:] == _DIGIT
    if (
        space[0]
        or space[-1]
        or bool((space[1:] & space[:-1]).any())
        or bool((minus & ~(after_space & before_digit)).any())
    ):
        raise ValueError("not a text of integers separated by single spaces")
    values = np.fromstring(text, dtype=np.int64, sep=" ")
    if len(values) != int(space.sum()) + 1 or bool(((values == _INT64.max) | (values == _INT64.min)).any()):
        try:  # at the edges of 64 bits: Python's own reading says whether it fits
            return np.array(text.split(), dtype=np.int64)
        except OverflowError as exc:
            raise ValueError(f"not a text of 64-bit integers: {exc}") from None
    return values
