"""The jobs' own tables. Alembic migrations create them; nothing else does.

Money and quantities are BIGINT units of 1/10,000 (see `rules.money`): exact on
every back end, including SQLite, whose NUMERIC is a float.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

billing_metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# Every run of every job: what ran, on what, how it ended.
billing_runs = Table(
    "billing_runs",
    billing_metadata,
    Column("run_id", String(36), primary_key=True),
    Column("job", String(32), nullable=False),
    Column("arguments", Text, nullable=False),  # JSON
    Column("period", String(32), nullable=False),
    Column("settings_hash", String(64), nullable=False),
    Column("code_version", String(32), nullable=False),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("status", String(16), nullable=False),  # running | succeeded | failed | locked | abandoned
    Column("started_at", DateTime, nullable=False),
    Column("finished_at", DateTime),
    Column("counts", Text),  # JSON
    Column("error", Text),
    Index("ix_billing_runs_job_started", "job", "started_at"),
)

# Who holds each writer lock (see db/lock.py): on PostgreSQL information only (the
# lock is the session advisory lock of `session_pid`), on SQLite the lock itself.
billing_locks = Table(
    "billing_locks",
    billing_metadata,
    Column("name", String(64), primary_key=True),
    Column("run_id", String(36), nullable=False),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("acquired_at", DateTime, nullable=False),
    Column("expires_at", DateTime),  # SQLite: the lease, on the database's clock; PostgreSQL: NULL
    Column("process_key", String(160)),  # boot, pid namespace and start time of the holder process
    Column("session_pid", Integer),  # PostgreSQL: backend pid of the session holding the lock
)

# Billing days the nightly job has billed (its catch-up starts after them).
billed_days = Table(
    "billed_days",
    billing_metadata,
    Column("billing_day", Date, primary_key=True),
    Column("run_id", String(36), nullable=False),
    Column("billed_at", DateTime, nullable=False),
)

# What was charged, as periods (`rules.periods`), in one of two forms. A run (`daily`
# NULL): one row per project, charge type and run of consecutive days of one month with
# the same account, daily quantity and daily amount (the storage fee); days
# first_day..last_day, both included, `days` their number, quantity and amount per day.
# A month (`daily` set): one row per project, charge type, month and account holding
# every day charged (the cloud fees, whose amounts differ day to day): `daily` lists
# `offset quantity amount` per day charged (offset from first_day, units), `days` their
# number, quantity and amount the month's totals. Canonical: runs of a (project, charge
# type) do not overlap and none could be merged. The storage fee of
# the current month may run past the last billed day: the nightly job stores it through
# the month's end as the lifecycle known then gives it (a quiet night changes nothing);
# the days up to the last one billed (`billed_days`, or a closed month) are charged.
charge_periods = Table(
    "charge_periods",
    billing_metadata,
    Column("project_id", String(64), primary_key=True),
    Column("charge_type", String(32), primary_key=True),
    Column("first_day", Date, primary_key=True),
    Column("last_day", Date, nullable=False),
    Column("days", Integer, nullable=False),
    Column("account_id", String(64), nullable=False),
    Column("quantity_units", BigInteger, nullable=False),  # per day (a run) or in all (a month)
    Column("amount_units", BigInteger, nullable=False),  # per day (a run) or in all (a month)
    Column("daily", Text),  # a month's days: "offset quantity amount ..."; NULL for a run
    Column("run_id", String(36), nullable=False),
    Column("recorded_at", DateTime, nullable=False),
    Index("ix_charge_periods_account_first", "account_id", "first_day"),
)

# Months that may hold stored charges. A run writes its month's row here, in a
# transaction of its own, before it writes any period of that month: a month without a
# row holds no period, and a run that finds none (a month's first night or first
# close) does not look stored periods up. Rows are never removed.
charge_months = Table(
    "charge_months",
    billing_metadata,
    Column("period", String(7), primary_key=True),
    Column("run_id", String(36), nullable=False),
    Column("recorded_at", DateTime, nullable=False),
)

# Month closes: a month is closed once its regular invoices are finalized.
month_closes = Table(
    "month_closes",
    billing_metadata,
    Column("period", String(7), primary_key=True),
    Column("closed_at", DateTime, nullable=False),
    Column("close_run_id", String(36), nullable=False),
    Column("last_run_id", String(36), nullable=False),
    Column("last_run_at", DateTime, nullable=False),
    Column("adjustments", Integer, nullable=False, default=0),
    # The billing settings the month was last billed with (`Settings.billing_values`).
    Column("settings_hash", String(64)),
    Column("settings", Text),  # JSON; NULL for months closed before settings were pinned
)

# A month's drafts held for finance's approval (`month-end --hold`, then `--approve`).
month_holds = Table(
    "month_holds",
    billing_metadata,
    Column("period", String(7), primary_key=True),
    Column("run_id", String(36), nullable=False),
    Column("kind", String(16), nullable=False),  # regular | adjustment: what its drafts are
    Column("settings_hash", String(64), nullable=False),
    Column("held_at", DateTime, nullable=False),
    Column("invoices", Integer, nullable=False),
    Column("total_units", BigInteger, nullable=False),
)

# Shards of a sharded month close (`month-end --shard I/N`): which run wrote each shard's
# drafts and whether it completed; `month-end --finalize` finalizes only a complete set.
month_shards = Table(
    "month_shards",
    billing_metadata,
    Column("period", String(7), primary_key=True),
    Column("shard_count", Integer, primary_key=True),
    Column("shard_index", Integer, primary_key=True),
    Column("run_id", String(36), nullable=False),
    Column("kind", String(16), nullable=False),  # regular | adjustment: what its drafts are
    Column("status", String(16), nullable=False),  # running | complete
    Column("settings_hash", String(64), nullable=False),
    Column("started_at", DateTime, nullable=False),
    Column("finished_at", DateTime),
    Column("invoices", Integer),
)

# What `reconcile` found for a closed month: one row per (month, reconcile run).
month_reconciles = Table(
    "month_reconciles",
    billing_metadata,
    Column("period", String(7), primary_key=True),
    Column("run_id", String(36), primary_key=True),
    Column("checked_at", DateTime, nullable=False),
    Column("status", String(16), nullable=False),  # ok | differs | busy
    Column("differences", Integer, nullable=False),  # (check, account, line type) rows
    Column("difference_units", BigInteger, nullable=False),  # sum of their absolute amounts
    Column("recomputed_differences", Integer, nullable=False),
    Column("stored_differences", Integer, nullable=False),
    Index("ix_month_reconciles_period_checked", "period", "checked_at"),
)

invoices = Table(
    "invoices",
    billing_metadata,
    Column("invoice_id", String(128), primary_key=True),
    Column("account_id", String(64), nullable=False),
    Column("period", String(7), nullable=False),
    Column("kind", String(16), nullable=False),  # regular | adjustment
    Column("sequence", Integer, nullable=False),  # 0 for regular, 1.. for adjustments
    Column("status", String(16), nullable=False),  # draft | finalized
    Column("total_units", BigInteger, nullable=False),
    Column("line_count", Integer, nullable=False),
    Column("run_id", String(36), nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("finalized_at", DateTime),
    # R-2026-000001 / A-2026-000001: set when finalized (`rules.numbering`); NULL for drafts.
    Column("invoice_number", String(32)),
    UniqueConstraint("account_id", "period", "kind", "sequence"),
    Index("ix_invoices_period_status", "period", "status"),
    Index("ix_invoices_invoice_number", "invoice_number", unique=True),
)

# The last invoice number given in each series (regular | adjustment) and year: numbers
# follow it without a gap and are never given again.
invoice_series = Table(
    "invoice_series",
    billing_metadata,
    Column("series", String(16), primary_key=True),
    Column("year", Integer, primary_key=True),
    Column("last_number", Integer, nullable=False),
)

invoice_lines = Table(
    "invoice_lines",
    billing_metadata,
    Column(
        "invoice_id",
        String(128),
        ForeignKey("invoices.invoice_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("project_id", String(64), primary_key=True),
    Column("line_type", String(32), primary_key=True),
    Column("account_id", String(64), nullable=False),
    Column("period", String(7), nullable=False),
    Column("quantity_units", BigInteger, nullable=False),
    Column("unit_price", String(32), nullable=False),
    Column("amount_units", BigInteger, nullable=False),
    Index("ix_invoice_lines_period_account", "period", "account_id"),
)

# Source rows that could not be billed, with the reason; one row per (row, reason).
# reject_id: a short id derived from the key (`rules.rejects.reject_id`), for people.
# A reject is open until resolved by a person or closed by a run that no longer found it
# (resolved_at, resolved_by, resolution say when, who or which job, and why).
rejects = Table(
    "rejects",
    billing_metadata,
    Column("source_table", String(32), primary_key=True),
    Column("source_id", String(64), primary_key=True),
    Column("reason", String(64), primary_key=True),
    Column("project_id", String(64)),
    Column("period", String(7), nullable=False),
    Column("detail", Text, nullable=False),
    Column("first_run_id", String(36), nullable=False),
    Column("first_seen_at", DateTime, nullable=False),
    Column("status", String(16), nullable=False),  # open | resolved | closed
    Column("reject_id", String(16), nullable=False),
    Column("resolved_at", DateTime),
    Column("resolved_by", String(64)),
    Column("resolution", Text),
    UniqueConstraint("reject_id"),
    Index("ix_rejects_period", "period"),
)


# --- The credits ledger (credits.md) ---------------------------------------------------

# Lots as the ledger last saw them: one per valid top-up, and one per restore lot.
credit_lots = Table(
    "credit_lots",
    billing_metadata,
    Column("lot_id", String(128), primary_key=True),
    Column("account_id", String(64), nullable=False),
    Column("channel", String(16), nullable=False),  # online | wire | code | restore
    Column("credit_units", BigInteger, nullable=False),
    Column("money_cents", BigInteger, nullable=False),
    Column("paid_at", DateTime, nullable=False),
    Column("valid_from", Date, nullable=False),
    Column("valid_until", Date, nullable=False),  # exclusive
    Column("run_id", String(36), nullable=False),
    Column("updated_at", DateTime, nullable=False),
    Index("ix_credit_lots_account", "account_id"),
)

# Ledger entries: never changed or deleted. One per natural key (the primary key, so
# that an account's new entries are stored next to its earlier ones); a correction of
# a written period is a further entry (revision 1, 2, ...) in the period of the run.
# entry_id, a hash of the natural key, is exported but not indexed (migration 0014).
credit_entries = Table(
    "credit_entries",
    billing_metadata,
    Column("entry_id", String(40), nullable=False),
    Column("account_id", String(64), primary_key=True),
    Column("lot_id", String(128), primary_key=True),  # "" for arrears
    Column("kind", String(16), primary_key=True),
    Column("day", Date, primary_key=True),
    Column("cause", String(16), primary_key=True),  # top_up | compute | invoice | refund | expiry
    Column("period", String(7), primary_key=True),
    Column("corrects", String(7), primary_key=True),  # "" or the closed month it corrects
    Column("revision", Integer, primary_key=True, autoincrement=False),
    Column("credit_units", BigInteger, nullable=False),
    Column("money_cents", BigInteger),  # fund and refund only
    Column("run_id", String(36), nullable=False),
    Column("recorded_at", DateTime, nullable=False),
    Index("ix_credit_entries_period", "period"),
    Index("ix_credit_entries_recorded_at", "recorded_at"),
)

# Each account's arrears and credits held at the end of each written period.
credit_balances = Table(
    "credit_balances",
    billing_metadata,
    Column("account_id", String(64), primary_key=True),
    Column("period", String(7), primary_key=True),
    Column("held_units", BigInteger, nullable=False),
    Column("arrears_units", BigInteger, nullable=False),
    Column("run_id", String(36), nullable=False),
)

# The state the entries give at the end of a written period, per account: each lot
# alive after that day (held, drawn, funded) and, as lot "", the arrears (held_units;
# NULL when the account had no arrears entry by then). The row of lot "" is there for
# every account of the period's write, so that an account's state is known. Rows of
# an account are dropped for every period up to whose end a later write adds an
# entry or changes a lot: a month-end continues from them instead of summing each
# lot's entries since it was funded (migration 0015).
credit_lot_states = Table(
    "credit_lot_states",
    billing_metadata,
    Column("account_id", String(64), primary_key=True),
    Column("period", String(7), primary_key=True),
    Column("lot_id", String(128), primary_key=True),  # "" for the arrears
    Column("held_units", BigInteger),
    Column("drawn_units", BigInteger, nullable=False),
    Column("funded_units", BigInteger, nullable=False),
    Column("run_id", String(36), nullable=False),
)

# Periods whose ledger a month-end has written through their last day.
credit_periods = Table(
    "credit_periods",
    billing_metadata,
    Column("period", String(7), primary_key=True),
    Column("run_id", String(36), nullable=False),
    Column("written_at", DateTime, nullable=False),
    Column("last_run_id", String(36), nullable=False),
    Column("last_written_at", DateTime, nullable=False),
)

# Refunds paid out: final once written (lot_id "" for a request that found nothing).
credit_refunds = Table(
    "credit_refunds",
    billing_metadata,
    Column("request_id", String(64), primary_key=True),
    Column("lot_id", String(128), primary_key=True),
    Column("account_id", String(64), nullable=False),
    Column("day", Date, nullable=False),
    Column("credit_units", BigInteger, nullable=False),
    Column("money_cents", BigInteger, nullable=False),
    Column("run_id", String(36), nullable=False),
    Column("written_at", DateTime, nullable=False),
)

# The inputs the written ledger was replayed with: compute per account and billing day,
# one row per account and month (`rules.day_values`: `day` the month's first day,
# `credit_units` its total, `daily` each day's units; migration 0016), and invoice totals
# per account and month (`day` the month's last day, no `daily`). A month-end continues
# an account from its written state when these are unchanged; late data shows as a
# difference.
credit_inputs = Table(
    "credit_inputs",
    billing_metadata,
    Column("account_id", String(64), primary_key=True),
    Column("day", BigInteger, primary_key=True),  # day number (days since 1970-01-01)
    Column("source", String(16), primary_key=True),  # compute | invoice
    Column("credit_units", BigInteger, nullable=False),
    Column("daily", Text),  # compute: `offset units` pairs, offsets from `day`
)
