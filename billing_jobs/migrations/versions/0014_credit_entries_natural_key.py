"""credit_entries: the natural key is the primary key; entry_id is no longer indexed

Revision ID: 0014
Revises: 0013

`entry_id` is a hash of an entry's natural key and revision: as the primary key its
index took every new entry at a random place, so a month's inserts touched more of
the index the longer the ledger grew (on SQLite at 125,000 entries a month, the sixth
month's inserts took 3x the first's). The natural key (account, lot, kind, day, cause,
period, corrects, revision), already unique, becomes the primary key: an account's new
entries go next to its earlier ones. `entry_id` stays a column, exported as before;
nothing looks an entry up by it.

PostgreSQL swaps the constraints in place (one index built, two dropped). SQLite
cannot change a primary key: the table is copied into its new form. Both in the
migration's one transaction: a kill rolls it back.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from billing_jobs import faults

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

NATURAL_KEY = ["account_id", "lot_id", "kind", "day", "cause", "period", "corrects", "revision"]
COLUMNS = [
    "entry_id",
    *NATURAL_KEY,
    "credit_units",
    "money_cents",
    "run_id",
    "recorded_at",
]
INDEXES = {"ix_credit_entries_period": ["period"], "ix_credit_entries_recorded_at": ["recorded_at"]}


def _columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("entry_id", sa.String(length=40), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("lot_id", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("cause", sa.String(length=16), nullable=False),
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("corrects", sa.String(length=7), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("credit_units", sa.BigInteger(), nullable=False),
        sa.Column("money_cents", sa.BigInteger(), nullable=True),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("recorded_at", sa.DateTime(), nullable=False),
    ]


def _copy_sqlite(*keys: sa.Constraint) -> None:
    """Copy credit_entries into a table of the same columns with `keys`, then swap."""
    op.create_table("credit_entries_new", *_columns(), *keys)
    names = ", ".join(COLUMNS)
    op.execute(f"INSERT INTO credit_entries_new ({names}) SELECT {names} FROM credit_entries")
    op.drop_table("credit_entries")
    op.rename_table("credit_entries_new", "credit_entries")
    for name, columns in INDEXES.items():
        op.create_index(name, "credit_entries", columns)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint("pk_credit_entries", "credit_entries", type_="primary")
        op.drop_constraint("uq_credit_entries_account_id", "credit_entries", type_="unique")
        op.create_primary_key("pk_credit_entries", "credit_entries", NATURAL_KEY)
    else:
        _copy_sqlite(sa.PrimaryKeyConstraint(*NATURAL_KEY, name="pk_credit_entries"))
    faults.in_migration(revision)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint("pk_credit_entries", "credit_entries", type_="primary")
        op.create_primary_key("pk_credit_entries", "credit_entries", ["entry_id"])
        op.create_unique_constraint("uq_credit_entries_account_id", "credit_entries", NATURAL_KEY)
    else:
        _copy_sqlite(
            sa.PrimaryKeyConstraint("entry_id", name="pk_credit_entries"),
            sa.UniqueConstraint(*NATURAL_KEY, name="uq_credit_entries_account_id"),
        )
