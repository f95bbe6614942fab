"""The run lock: one lease row per lock name, taken atomically, with expiry.

Works the same on SQLite and PostgreSQL: `INSERT .. ON CONFLICT DO UPDATE ..
WHERE expires_at < now` takes a free or expired lease in one statement. A run
renews its lease inside each of its write transactions (`assert_held`), so a run
that lost its lease (it stalled past expiry and another run took over) cannot
commit anything.

Why a renewal and a takeover cannot both win:

- PostgreSQL: every write transaction holds the lease row `FOR KEY SHARE` until it
  ends (after renewing the lease in a short transaction of its own), so the
  workers of one run write at the same time. A takeover DELETEs the expired row,
  which waits for every such transaction and then re-checks `expires_at < now`
  against the row as renewed meanwhile, so it finds the lease held. The other way
  round, a write transaction that waits for an uncommitted takeover re-checks
  `run_id` and finds the row is no longer its own.
- SQLite: every write transaction holds the database's single write lock, so the
  renewal, the takeover and the work they guard are serialized as wholes; the
  busy timeout set in `db.engine.make_engine` makes the second writer wait.

Heartbeat: the lease is renewed at the start of every write transaction (every
chunk), not by a background thread. A thread would keep renewing the lease of
a process that is hung rather than dead, so a stuck run would hold the lock
forever; renewing only when work is committed means a lease outlives its run by
at most `lease_seconds`. The limit this sets: one chunk (reading, computing and
writing it) must take less than `[lock] lease_seconds`. A run that overruns it
is not unsafe: its next write raises `LockLost` if another run took over in the
meantime, and commits nothing. Timestamps come from each host's clock; hosts
sharing a database need clocks that agree to well within `lease_seconds`.

Shards: a sharded month-end (`--shard I/N`) holds `billing-writer/shard-I-of-N`.
The shards of one split run at once; any other writer (a whole run, `--finalize`,
a shard of another split) is excluded. Whoever takes a lease checks, in the same
transaction, that no excluding lease is live, and otherwise gives it back and
reports the holder; two runs racing for excluding leases may both back off (exit
75, try again), never both proceed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, delete, select, text, update
from sqlalchemy.dialects import postgresql, sqlite

from billing_jobs.db.billing_tables import billing_locks

WRITER_LOCK = "billing-writer"
SHARD_LOCK_PREFIX = WRITER_LOCK + "/shard-"
ACQUIRE_KEY = 0x62696C6C  # the advisory lock that serializes lease takers on PostgreSQL


def writer_lock_name(shard_index: int | None = None, shard_count: int = 1) -> str:
    """The writer lock of a whole run, or of one shard of a sharded month-end (`I-of-N`)."""
    if shard_index is None:
        return WRITER_LOCK
    return f"{SHARD_LOCK_PREFIX}{shard_index}-of-{shard_count}"


def _shard_count(name: str) -> int | None:
    return int(name.rsplit("-of-", 1)[1]) if name.startswith(SHARD_LOCK_PREFIX) else None


def compatible(mine: str, other: str) -> bool:
    """Whether two writer leases may be held at once: shards of the same split of the
    accounts (same N, different I) may; anything else excludes the other."""
    a, b = _shard_count(mine), _shard_count(other)
    return a is not None and a == b and mine != other


class LockHeld(RuntimeError):
    """Another run holds the lock."""

    def __init__(self, name: str, run_id: str, host: str, pid: int, expires_at: datetime):
        self.name, self.run_id, self.host, self.pid, self.expires_at = (
            name,
            run_id,
            host,
            pid,
            expires_at,
        )
        super().__init__(
            f"another run holds the lock '{name}' (run {run_id} on {host}, pid {pid}) "
            f"until {expires_at:%Y-%m-%d %H:%M:%S} UTC"
        )


class LockLost(RuntimeError):
    """This run's lease expired and another run took it over."""


@dataclass
class Lease:
    engine: Engine
    name: str
    run_id: str
    host: str
    pid: int
    seconds: int

    def acquire(self, now: datetime) -> None:
        """Take the lock, or raise `LockHeld`. Commits on its own."""
        values = {
            "name": self.name,
            "run_id": self.run_id,
            "host": self.host,
            "pid": self.pid,
            "acquired_at": now,
            "expires_at": now + timedelta(seconds=self.seconds),
        }
        for _attempt in range(3):
            with self.engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    # Takers of writer leases one at a time, so each sees the leases of the
                    # others (SQLite's single writer does the same by itself).
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ACQUIRE_KEY})
                if conn.dialect.name == "postgresql":
                    # An expired lease is deleted, then a new one inserted: the DELETE waits
                    # for any write transaction still holding the old lease (FOR KEY SHARE,
                    # see `assert_held`) and re-checks the expiry after it.
                    conn.execute(
                        delete(billing_locks).where(
                            billing_locks.c.name == self.name, billing_locks.c.expires_at < now
                        )
                    )
                    stmt = (
                        postgresql.insert(billing_locks)
                        .values(**values)
                        .on_conflict_do_nothing()
                        .returning(billing_locks.c.run_id)
                    )
                else:
                    ins = sqlite.insert(billing_locks).values(**values)
                    stmt = ins.on_conflict_do_update(
                        index_elements=["name"],
                        set_={k: ins.excluded[k] for k in values if k != "name"},
                        where=billing_locks.c.expires_at < now,
                    ).returning(billing_locks.c.run_id)
                if conn.execute(stmt).first() is not None:
                    blocker = self._blocker(conn, now)
                    if blocker is None:
                        return
                    # Raising rolls the transaction back: the lease just taken is given back.
                    raise LockHeld(
                        blocker.name, blocker.run_id, blocker.host, blocker.pid, blocker.expires_at
                    )
                row = conn.execute(select(billing_locks).where(billing_locks.c.name == self.name)).first()
            if row is not None:
                raise LockHeld(self.name, row.run_id, row.host, row.pid, row.expires_at)
            # PostgreSQL: the holder released the lease between the two statements; try again.
        raise LockHeld(self.name, "unknown", "unknown", 0, now)

    def _blocker(self, conn: Connection, now: datetime) -> Any:
        """A live writer lease of another name that excludes this one (see `compatible`)."""
        others = conn.execute(
            select(billing_locks).where(
                billing_locks.c.name.like(WRITER_LOCK + "%"),
                billing_locks.c.name != self.name,
                billing_locks.c.expires_at >= now,
            )
        ).all()
        if not self.name.startswith(WRITER_LOCK):
            return None
        return next((row for row in others if not compatible(self.name, row.name)), None)

    def assert_held(self, conn: Connection, now: datetime) -> None:
        """Prove the lease is ours inside the caller's write transaction (and renew it);
        raise `LockLost` if it is gone.

        PostgreSQL: the lease is renewed in a short transaction of its own, then this
        transaction holds the lease row `FOR KEY SHARE` until it commits. Many write
        transactions of one run (its worker processes) hold that lock at once, and so
        does a renewal (an UPDATE of a non-key column); a takeover's DELETE waits for all
        of them. SQLite: the renewal is an UPDATE in this transaction (its writes are
        serialized anyway).
        """
        if conn.dialect.name == "postgresql":
            with self.engine.begin() as own:
                self._renew(own, now)
            mine = billing_locks.c.name == self.name, billing_locks.c.run_id == self.run_id
            held = conn.execute(
                select(billing_locks.c.name).where(*mine).with_for_update(read=True, key_share=True)
            ).first()
            if held is None:
                raise LockLost(f"lock '{self.name}' was taken over by another run; nothing committed")
            return
        self._renew(conn, now)

    def _renew(self, conn: Connection, now: datetime) -> None:
        renewed = conn.execute(
            update(billing_locks)
            .where(billing_locks.c.name == self.name, billing_locks.c.run_id == self.run_id)
            .values(expires_at=now + timedelta(seconds=self.seconds))
            .returning(billing_locks.c.name)
        ).first()
        if renewed is None:
            raise LockLost(f"lock '{self.name}' was taken over by another run; nothing committed")

    def release(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                delete(billing_locks).where(
                    billing_locks.c.name == self.name, billing_locks.c.run_id == self.run_id
                )
            )
