"""Exports as CSV or Parquet from the same typed rows (docs/exports.md).

An export is a list of fields and batches of rows whose values are typed: ids and
names as `str`, amounts as integer units (1/10,000, or cents for money), days as
`date`, times as naive UTC `datetime`, and `None` where there is nothing. CSV
writes them as the contract's text; Parquet as typed columns: amounts are
`decimal128(19, 4)` (`decimal128(19, 2)` for money) built from the integer units
exactly (never through a float), days `date32`, times `timestamp[ms, UTC]` holding
whole seconds (as the CSV). An empty CSV field is a null in Parquet.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from billing_jobs.rules.money import MAX_FRACTION_DIGITS, format_cents, format_units

FORMATS = ("csv", "parquet")
# Any BIGINT of units fits 19 digits: int64 is below 10**19.
DECIMAL_DIGITS = 19
TIMESTAMP_TEXT = "%Y-%m-%dT%H:%M:%SZ"

Row = Sequence[Any]


@dataclass(frozen=True)
class Kind:
    """How one type of value is written: its CSV text and its Arrow type."""

    arrow: pa.DataType
    text: Callable[[Any], str]


def _timestamp_text(value: datetime) -> str:
    return value.strftime(TIMESTAMP_TEXT)


def _day_text(value: date) -> str:
    return value.isoformat()


STRING = Kind(pa.string(), str)
INTEGER = Kind(pa.int32(), str)
UNITS = Kind(pa.decimal128(DECIMAL_DIGITS, MAX_FRACTION_DIGITS), format_units)  # credits, quantities
CENTS = Kind(pa.decimal128(DECIMAL_DIGITS, 2), format_cents)  # money
DAY = Kind(pa.date32(), _day_text)
TIMESTAMP = Kind(pa.timestamp("ms", tz="UTC"), _timestamp_text)  # Parquet has no seconds unit


@dataclass(frozen=True)
class Field:
    name: str
    kind: Kind


@dataclass(frozen=True)
class Rows:
    """An export: its fields, and its rows in batches (read lazily, in order)."""

    fields: Sequence[Field]
    batches: Iterable[list[Row]]

    @property
    def header(self) -> list[str]:
        return [f.name for f in self.fields]

    def schema(self) -> pa.Schema:
        return schema_of(self.fields)


def schema_of(fields: Sequence[Field]) -> pa.Schema:
    return pa.schema([pa.field(f.name, f.kind.arrow, nullable=True) for f in fields])


def write_csv(rows: Rows, out: TextIO) -> int:
    """The rows as CSV with a header row; returns how many rows were written."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(rows.header)
    texts = [f.kind.text for f in rows.fields]
    written = 0
    for batch in rows.batches:
        writer.writerows(
            ["" if v is None else text(v) for v, text in zip(row, texts, strict=True)] for row in batch
        )
        written += len(batch)
    return written


def decimal_array(units: Sequence[int | None], arrow: pa.Decimal128Type) -> pa.Array:
    """Integer units as decimals of `arrow`'s scale, exactly: each value is the unscaled
    integer of its decimal (12345 units at scale 4 is 1.2345), written as Arrow's
    128-bit two's complement (the int64 and its sign extension)."""
    mask = np.fromiter((u is None for u in units), dtype=bool, count=len(units))
    values = np.fromiter((0 if u is None else u for u in units), dtype=np.int64, count=len(units))
    words = np.empty((len(values), 2), dtype="<i8")
    words[:, 0] = values
    words[:, 1] = values >> 63
    nulls = int(mask.sum())
    validity = pa.array(~mask).buffers()[1] if nulls else None
    return pa.Array.from_buffers(arrow, len(values), [validity, pa.py_buffer(words.tobytes())], nulls)


def _column(values: list[Any], kind: Kind) -> pa.Array:
    if isinstance(kind.arrow, pa.Decimal128Type):
        return decimal_array(values, kind.arrow)
    if kind is TIMESTAMP:
        values = [None if v is None else v.replace(microsecond=0) for v in values]  # as the CSV
    return pa.array(values, type=kind.arrow)


def arrow_batch(rows: Rows, batch: list[Row]) -> pa.Table:
    columns = list(zip(*batch, strict=True)) if batch else [() for _ in rows.fields]
    arrays = [_column(list(c), f.kind) for c, f in zip(columns, rows.fields, strict=True)]
    return pa.Table.from_arrays(arrays, schema=rows.schema())


def write_parquet(rows: Rows, path: str | Path) -> int:
    """The rows as one Parquet file (a row group per batch); returns how many rows."""
    written = 0
    with pq.ParquetWriter(str(path), rows.schema()) as writer:
        for batch in rows.batches:
            if batch:
                writer.write_table(arrow_batch(rows, batch))
                written += len(batch)
        if not written:
            writer.write_table(arrow_batch(rows, []))
    return written


def write_export(rows: Rows, fmt: str, output: str | None) -> int:
    """Write an export as CSV (to stdout without `output`) or Parquet (to `output`).

    A file is written whole: to `<output>.partial`, renamed at the end (removed if
    the export fails).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}")
    if not output:
        if fmt != "csv":
            raise ValueError("a Parquet export needs an output file")
        n = write_csv(rows, sys.stdout)
        sys.stdout.flush()
        return n
    tmp = Path(output).with_name(Path(output).name + ".partial")
    try:
        if fmt == "parquet":
            n = write_parquet(rows, tmp)
        else:
            with tmp.open("w", newline="", encoding="utf-8") as out:
                n = write_csv(rows, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, output)
    return n
