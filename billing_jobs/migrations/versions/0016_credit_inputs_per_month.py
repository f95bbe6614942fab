"""credit_inputs: the ledger's compute inputs stored per account and month

Revision ID: 0016
Revises: 0015

The credits ledger stores the compute per account and billing day it was written with,
so that a later month-end can tell late data from what it already replayed. One row
per account and day was most of the ledger's rows (at 50 projects per account, 0.64
of the 5.14 rows a project-month wrote). This revision adds `credit_inputs.daily` and
stores the compute in the month form of `rules.day_values`: one row per account and
month (`day` the month's first day, `credit_units` its total, `daily` each day's units
as `offset units` pairs). The invoice totals stay one row per account and month.
Converted in batches of accounts, in the migration's one transaction: a kill rolls it
back, and a re-run starts over. Downgrade expands the months back into days.
"""

from __future__ import annotations

from collections.abc import Iterator

import sqlalchemy as sa
from alembic import op

from billing_jobs import faults
from billing_jobs.db.billing_tables import credit_inputs
from billing_jobs.db.reads import read_frame
from billing_jobs.db.writes import bulk_insert
from billing_jobs.rules import day_values

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

ACCOUNTS_PER_BATCH = 5_000
_TABLE = sa.table(
    "credit_inputs",
    sa.column("account_id", sa.String),
    sa.column("day", sa.BigInteger),
    sa.column("source", sa.String),
    sa.column("credit_units", sa.BigInteger),
    sa.column("daily", sa.Text),
)
_COLUMNS = ["account_id", "day", "source", "credit_units", "daily"]


def _batches(conn: sa.Connection, which: sa.ColumnElement[bool]) -> Iterator[list[str]]:
    """The ids of the accounts with compute rows to convert, in batches, in id order."""
    t = _TABLE.c
    after: str | None = None
    while True:
        stmt = sa.select(t.account_id).where(t.source == "compute", which).distinct()
        if after is not None:
            stmt = stmt.where(t.account_id > after)
        ids = [a for (a,) in conn.execute(stmt.order_by(t.account_id).limit(ACCOUNTS_PER_BATCH))]
        if not ids:
            return
        yield ids
        after = ids[-1]


def _convert(conn: sa.Connection, which: sa.ColumnElement[bool], form: str) -> None:
    """Every compute row matching `which` rewritten in `form` ("months" or "days")."""
    t = _TABLE.c
    for ids in _batches(conn, which):
        mine = [t.account_id.in_(ids), t.source == "compute", which]
        old = read_frame(
            conn,
            sa.select(t.account_id, t.day, t.credit_units, t.daily).where(*mine),
            ints=["day", "credit_units"],
            aggregate=True,
        )
        if form == "months":
            new = day_values.to_months(old.rename(columns={"credit_units": "units"}))
        else:
            new = day_values.to_days(old).assign(daily=None)
        new = new.rename(columns={"units": "credit_units"}).assign(source="compute")
        conn.execute(sa.delete(_TABLE).where(*mine))
        bulk_insert(conn, credit_inputs, new[_COLUMNS].astype({"day": "int64", "credit_units": "int64"}))


def upgrade() -> None:
    op.add_column("credit_inputs", sa.Column("daily", sa.Text(), nullable=True))
    _convert(op.get_bind(), _TABLE.c.daily.is_(None), "months")
    faults.in_migration(revision)


def downgrade() -> None:
    _convert(op.get_bind(), _TABLE.c.daily.is_not(None), "days")
    with op.batch_alter_table("credit_inputs") as batch:
        batch.drop_column("daily")
