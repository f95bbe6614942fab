"""Redemption codes: unguessable, easy to type, with a check character.

A code is 16 random characters (80 bits from `secrets`) of an alphabet of 32
without look-alikes (no 0/O, 1/I), then one check character (Luhn mod 32), in
groups of four: `K7QX-M2WD-9HTR-C4NB-F`. The check character catches every single
mistyped character, so two valid codes always differ in at least two characters.
"""

from __future__ import annotations

import secrets

ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZ"
RANDOM_CHARS = 16  # 16 x 5 bits = 80 random bits
_INDEX = {c: i for i, c in enumerate(ALPHABET)}


def check_character(body: str) -> str:
    """Luhn mod N over the alphabet: detects any single substituted character."""
    n = len(ALPHABET)
    factor, total = 2, 0
    for char in reversed(body):
        addend = factor * _INDEX[char]
        factor = 1 if factor == 2 else 2
        total += addend // n + addend % n
    return ALPHABET[(n - total % n) % n]


def format_code(body: str) -> str:
    full = body + check_character(body)
    return "-".join(full[i : i + 4] for i in range(0, len(full), 4))


def is_valid(code: str) -> bool:
    plain = code.replace("-", "").upper()
    if len(plain) != RANDOM_CHARS + 1 or any(c not in _INDEX for c in plain):
        return False
    return check_character(plain[:-1]) == plain[-1]


def new_codes(count: int, taken: set[str] | None = None) -> list[str]:
    """`count` new codes, none in `taken` and none repeated."""
    seen = set(taken or ())
    out: list[str] = []
    while len(out) < count:
        body = "".join(secrets.choice(ALPHABET) for _ in range(RANDOM_CHARS))
        code = format_code(body)
        if code not in seen:
            seen.add(code)
            out.append(code)
    return out
