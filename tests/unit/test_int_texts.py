"""`rules.int_texts`: many integers as one text, written and read a column at a time."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing_jobs.rules.int_texts import group_texts, integers

INT64 = st.integers(-(2**63), 2**63 - 1)


@settings(max_examples=200, deadline=None)
@given(st.lists(INT64, min_size=1, max_size=60))
def test_a_text_of_integers_reads_back_exactly_what_python_writes(numbers: list[int]) -> None:
    text = " ".join(map(str, numbers))
    assert integers(text).tolist() == numbers
    assert integers(text).dtype == np.int64


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 40), INT64, st.integers(-(10**6), 10**12)), min_size=1, max_size=50),
    st.data(),
)
def test_group_texts_spell_each_groups_rows_in_order(
    rows: list[tuple[int, int, int]], data: st.DataObject
) -> None:
    values = np.array(rows, dtype=np.int64)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(rows) - 1), max_size=5))) if len(rows) > 1 else []
    first = np.array([0, *cuts], dtype=np.int64)
    texts = group_texts(values, first)
    bounds = [*first.tolist(), len(rows)]
    assert texts == [" ".join(str(n) for row in rows[a:b] for n in row) for a, b in pairwise(bounds)]
    assert integers(" ".join(texts)).tolist() == [n for row in rows for n in row]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 40), st.integers(-(10**9) + 1, 10**9 - 1), st.sampled_from([0, 9, 10, 10**9 - 1])
        ),
        min_size=1,
        max_size=50,
    )
)
def test_numbers_of_up_to_nine_digits_are_spelled_as_python_does(rows: list[tuple[int, int, int]]) -> None:
    """Nine digits at most: the digits are found in 32 bits (the common case: day
    offsets, most amounts); one group per row."""
    values = np.array(rows, dtype=np.int64)
    texts = group_texts(values, np.arange(len(rows), dtype=np.int64))
    assert texts == [" ".join(map(str, row)) for row in rows]


def test_nine_and_ten_digits_and_the_ends_of_64_bits() -> None:
    values = np.array([[999_999_999, -999_999_999, 0], [10**9, -(2**63), 2**63 - 1]], dtype=np.int64)
    assert group_texts(values[:1], np.array([0])) == ["999999999 -999999999 0"]
    assert group_texts(np.array([[9_999_999_999, -1, 2]]), np.array([0])) == ["9999999999 -1 2"]
    assert group_texts(values, np.array([0, 1])) == [
        "999999999 -999999999 0",
        f"1000000000 {-(2**63)} {2**63 - 1}",
    ]


def test_offsets_from_the_table_and_large_numbers_are_spelled_the_same() -> None:
    values = np.array([[0, 1023, -1], [1024, 7, 2**63 - 1]], dtype=np.int64)
    assert group_texts(values, np.array([0, 1])) == ["0 1023 -1", f"1024 7 {2**63 - 1}"]


def test_an_empty_text_is_no_integers() -> None:
    assert integers("").tolist() == []


@pytest.mark.parametrize(
    "text",
    [
        "1 2 x",  # another character
        "1.5",
        "1e3",
        "+5",
        "\u0663",  # a digit of another script
        "1  2",  # two spaces
        " 1",
        "1 ",
        "1\t2",
        "5-3 7",  # a sign inside a number
        "- 5",
        "--5",
        "1 -",
        "-",
        "9223372036854775808",  # beyond 64 bits
        "-9223372036854775809",
        "99999999999999999999 1",
    ],
)
def test_anything_but_integers_separated_by_single_spaces_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a text of"):
        integers(text)


def test_the_edges_of_64_bits_are_read_exactly() -> None:
    assert integers("9223372036854775807 -9223372036854775808 0").tolist() == [2**63 - 1, -(2**63), 0]
