"""rejects: short ids, and who resolved or which run closed each one

Revision ID: 0006
Revises: 0005

Each reject gets `reject_id`, a short id derived from its key (source_table,
source_id, reason) that people type to resolve it (unique; filled in here for the
rejects already recorded), and `resolved_at`, `resolved_by`, `resolution`. Status
`reviewed` (which nothing set) becomes `resolved`.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# The ids runs give new rejects: those filled in here must be the same.
from billing_jobs.rules.rejects import reject_id

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rejects", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reject_id", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("resolved_at", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("resolved_by", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("resolution", sa.Text(), nullable=True))
    conn = op.get_bind()
    rejects = sa.table(
        "rejects",
        sa.column("source_table", sa.String),
        sa.column("source_id", sa.String),
        sa.column("reason", sa.String),
        sa.column("reject_id", sa.String),
        sa.column("status", sa.String),
        sa.column("resolution", sa.Text),
    )
    r = rejects.c
    keys = conn.execute(sa.select(r.source_table, r.source_id, r.reason)).all()
    fill = (
        sa.update(rejects)
        .where(
            r.source_table == sa.bindparam("t"),
            r.source_id == sa.bindparam("s"),
            r.reason == sa.bindparam("why"),
        )
        .values(reject_id=sa.bindparam("rid"))
    )
    for start in range(0, len(keys), 5_000):
        conn.execute(
            fill,
            [
                {"t": t, "s": s, "why": why, "rid": reject_id(t, s, why)}
                for t, s, why in keys[start : start + 5_000]
            ],
        )
    conn.execute(
        sa.update(rejects)
        .where(r.status == "reviewed")
        .values(status="resolved", resolution="marked reviewed before resolutions were recorded")
    )
    with op.batch_alter_table("rejects", schema=None) as batch_op:
        batch_op.alter_column("reject_id", existing_type=sa.String(length=16), nullable=False)
        batch_op.create_unique_constraint(batch_op.f("uq_rejects_reject_id"), ["reject_id"])


def downgrade() -> None:
    conn = op.get_bind()
    conn.execute(sa.text("UPDATE rejects SET status = 'reviewed' WHERE status IN ('resolved', 'closed')"))
    with op.batch_alter_table("rejects", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_rejects_reject_id"), type_="unique")
        batch_op.drop_column("resolution")
        batch_op.drop_column("resolved_by")
        batch_op.drop_column("resolved_at")
        batch_op.drop_column("reject_id")
