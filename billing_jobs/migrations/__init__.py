"""Alembic migrations of the jobs' own tables.

`include_object` and `VERSION_TABLE` are shared by `env.py` and by the tests that
check the models and the migrations agree, so both compare exactly the same
objects.
"""

from __future__ import annotations

from typing import Any

from billing_jobs.db.billing_tables import billing_metadata

VERSION_TABLE = "billing_alembic_version"


def include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    """Only the jobs' own tables and what belongs to them: the five source tables
    (and anything else in the database) are never created, altered or dropped."""
    if type_ == "table":
        return name in billing_metadata.tables
    table = getattr(obj, "table", None)
    if table is not None:
        return table.name in billing_metadata.tables
    return True
