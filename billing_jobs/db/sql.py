"""Which accounts a statement is about: `Chunk` and `among`, the SQL membership test
every chunked read and write uses. No pandas here: the commands that only read
(`status`, `rejects`) use it at start-up."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Boolean, ColumnElement, String, bindparam, literal
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.types import NullType


@dataclass(frozen=True)
class Chunk:
    """A set of accounts named one by one, or every account (`accounts` None).

    The database decides membership by equality on `account_id` against the named
    ids (one array parameter), never by comparing ids in order, so no collation is
    involved and every chunk holds exactly the accounts it names.
    """

    accounts: tuple[str, ...] | None = None
    index: int = 0
    projects: int = 0

    @classmethod
    def only(cls, account_id: str) -> Chunk:
        return cls(accounts=(account_id,))

    def clause(self, column: ColumnElement[Any]) -> ColumnElement[bool]:
        if self.accounts is None:
            return literal(True)
        return among(column, self.accounts)


class _Among(ColumnElement[bool]):
    """`column` is one of `values`: `= ANY(array)` on PostgreSQL, `IN (json_each(...))` on
    SQLite; one bound parameter whatever the number of values."""

    inherit_cache = False
    type = Boolean()
    _is_implicitly_boolean = True  # a condition itself: never rendered as `(...) = 1`

    def __init__(self, column: ColumnElement[Any], values: Sequence[str]) -> None:
        self.column = column
        self.values = list(values)


def among(column: ColumnElement[Any], values: Sequence[str]) -> ColumnElement[bool]:
    return _Among(column, values)


@compiles(_Among, "postgresql")
def _among_postgresql(element: _Among, compiler: Any, **kw: Any) -> str:
    from sqlalchemy.dialects import postgresql  # not at import: it loads asyncio (start-up time)

    literal = array_text(element.values)
    if literal is None:
        values = bindparam(None, element.values, type_=postgresql.ARRAY(String))
        return f"{compiler.process(element.column, **kw)} = ANY({compiler.process(values, **kw)})"
    # Untyped: the driver sends the text as of unknown type, so the server reads it as
    # the array the cast names when it binds it (a constant the planner hashes).
    text = bindparam(None, literal, type_=NullType())
    return f"{compiler.process(element.column, **kw)} = ANY({compiler.process(text, **kw)}::VARCHAR[])"


def array_text(values: Sequence[str | int | None]) -> str | None:
    """The values as one PostgreSQL array text, every string double-quoted and None as
    NULL: JSON's list text with braces for brackets, made in C. Where JSON escaped
    anything (a quote, a backslash, a control or non-ASCII character) the two escapings
    differ: None, and the caller sends the list itself (the driver's Python call and
    regular expression per element)."""
    text = json.dumps(list(values), separators=(",", ":"))
    if "\\" in text:
        return None
    return "{" + text[1:-1] + "}"


@compiles(_Among)
def _among_default(element: _Among, compiler: Any, **kw: Any) -> str:
    values = bindparam(None, json.dumps(element.values), type_=String)
    return (
        f"{compiler.process(element.column, **kw)} IN "
        f"(SELECT value FROM json_each({compiler.process(values, **kw)}))"
    )
