"""Money: exact credits as integer units of 1/10,000 credit.

Amounts have at most four fractional digits, so every amount the jobs handle is a
whole number of units. Arithmetic on whole columns is integer arithmetic;
`Decimal` appears only at the edges (settings in, CSV out). The one rounding
rule, half up (away from zero) to four decimals, lives in `round_half_up_units`.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy only where whole columns are computed (start-up time)
    import numpy as np
    import numpy.typing as npt

    IntArray = npt.NDArray[np.int64]

MAX_FRACTION_DIGITS = 4
UNITS_PER_CREDIT = 10**MAX_FRACTION_DIGITS
_QUANTUM = Decimal(1).scaleb(-MAX_FRACTION_DIGITS)
_INT64_SAFE = 2**62


def to_units(value: Decimal | int | str) -> int:
    """Exact units of a decimal amount, rounded half up to four decimals."""
    dec = Decimal(value).quantize(_QUANTUM, rounding=ROUND_HALF_UP)
    return int(dec.scaleb(MAX_FRACTION_DIGITS))


def to_decimal(units: int) -> Decimal:
    """The exact decimal of a whole number of units."""
    return Decimal(int(units)).scaleb(-MAX_FRACTION_DIGITS)


def format_units(units: int) -> str:
    """A plain decimal string (no exponent, no separators), trailing zeros trimmed.

    12345 -> "1.2345", 290000 -> "29", -290000 -> "-29", 0 -> "0".
    """
    text = f"{to_decimal(units):f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def format_cents(cents: int) -> str:
    """Money in cents as a plain decimal with two fractional digits: 1999 -> "19.99"."""
    sign = "-" if cents < 0 else ""
    whole, part = divmod(abs(int(cents)), 100)
    return f"{sign}{whole}.{part:02d}"


def format_decimal(value: Decimal) -> str:
    """A plain decimal string for any exact decimal (used for unit prices)."""
    text = f"{value.normalize():f}"
    return "0" if text in ("-0", "") else text


def price_fraction(price: Decimal) -> tuple[int, int]:
    """A price as (numerator, denominator) with a power-of-ten denominator."""
    sign, digits, exponent = price.as_tuple()
    assert isinstance(exponent, int), "prices are finite"
    numerator = int("".join(map(str, digits)) or "0") * (-1 if sign else 1)
    if exponent >= 0:
        return numerator * 10**exponent, 1
    return numerator, 10 ** (-exponent)


def round_half_up_units(quantity_units: IntArray, price: Decimal) -> IntArray:
    """Amount units of `quantity * price`, rounded half up (away from zero) to 4 decimals.

    `quantity_units` are units of 1/10,000 of the measured quantity; the result is
    units of 1/10,000 credit: exactly round_half_up(quantity * price, 4).
    """
    import numpy as np

    num, den = price_fraction(price)
    q = np.asarray(quantity_units, dtype=np.int64)
    largest = int(np.abs(q).max()) if q.size else 0
    if largest * abs(num) * 2 + den >= _INT64_SAFE:
        # Rare huge values: exact Python integers, still one array operation.
        obj = q.astype(object)
        product = obj * num
        mag = (abs(product) * 2 + den) // (2 * den)
        signed = np.where(product < 0, -mag, mag)
        return np.asarray(signed, dtype=object).astype(np.int64)
    product = q * num
    mag = (np.abs(product) * 2 + den) // (2 * den)
    return np.where(product < 0, -mag, mag).astype(np.int64)
