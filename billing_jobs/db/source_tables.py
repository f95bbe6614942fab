"""The platform's source tables (five for billing, three for credits), exactly as `contract.md` defines them.

The jobs only ever read these tables. The project keeps this definition so that
reads are typed, and so that tests and the demo can create a source database.
They live on their own MetaData so that Alembic never creates, alters or drops
them.
"""

from __future__ import annotations

from sqlalchemy import (
    Column,
    Date,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
)

source_metadata = MetaData()

# The jobs never read an amount through the driver's number conversion: every read
# of an amount goes through the exact SQL in `db.reads` (integer units).
accounts = Table(
    "accounts",
    source_metadata,
    Column("account_id", String(64), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("name", String(200), nullable=False),
    Column("created_at", DateTime, nullable=False),
)

projects = Table(
    "projects",
    source_metadata,
    Column("project_id", String(64), primary_key=True),
    Column("account_id", String(64), ForeignKey("accounts.account_id"), nullable=False),
    Column("name", String(200), nullable=False),
    Column("created_at", DateTime, nullable=False),
)

project_events = Table(
    "project_events",
    source_metadata,
    Column("event_id", String(64), primary_key=True),
    Column("project_id", String(64), nullable=False),
    Column("occurred_at", DateTime, nullable=False),
    Column("kind", String(16), nullable=False),
)

compute_usage = Table(
    "compute_usage",
    source_metadata,
    Column("usage_id", String(64), primary_key=True),
    Column("project_id", String(64), nullable=False),
    Column("occurred_at", DateTime, nullable=False),
    Column("credits", Numeric(18, 4), nullable=True),
)

cloud_usage = Table(
    "cloud_usage",
    source_metadata,
    Column("usage_id", String(64), primary_key=True),
    Column("project_id", String(64), nullable=False),
    Column("usage_date", Date, nullable=False),
    Column("metric", String(32), nullable=False),
    Column("quantity", Numeric(18, 4), nullable=True),
)

# Credits (contract.md, section Credits).
top_ups = Table(
    "top_ups",
    source_metadata,
    Column("top_up_id", String(64), primary_key=True),
    Column("account_id", String(64), nullable=False),
    Column("channel", String(16), nullable=False),
    Column("credits", Numeric(18, 4), nullable=True),
    Column("amount_paid", Numeric(18, 2), nullable=True),
    Column("paid_at", DateTime, nullable=False),
    Column("code", String(64), nullable=True),
)

redemption_codes = Table(
    "redemption_codes",
    source_metadata,
    Column("code", String(64), primary_key=True),
    Column("batch_id", String(64), nullable=False),
    Column("credits", Numeric(18, 4), nullable=False),
    Column("redeem_by", DateTime, nullable=False),
    Column("valid_days", Integer, nullable=False),
)

refund_requests = Table(
    "refund_requests",
    source_metadata,
    Column("request_id", String(64), primary_key=True),
    Column("account_id", String(64), nullable=False),
    Column("requested_at", DateTime, nullable=False),
)

SOURCE_TABLES = (
    accounts,
    projects,
    project_events,
    compute_usage,
    cloud_usage,
    top_ups,
    redemption_codes,
    refund_requests,
)
