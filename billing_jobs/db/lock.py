"""The run lock: one lease row per lock name, taken atomically, with expiry.

Works the same on SQLite and PostgreSQL: `INSERT .. ON CONFLICT DO UPDATE ..
WHERE expires_at < now` takes a free or expired lease in one statement. A run
renews its lease inside each of its write transactions (`assert_held`), so a run
that lost its lease (it stalled past expiry and another run took over) cannot
commit anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite

from billing_jobs.db.billing_tables import billing_locks

WRITER_LOCK = "billing-writer"


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
        with self.engine.begin() as conn:
            dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
            ins = dialect.insert(billing_locks).values(**values)
            stmt = ins.on_conflict_do_update(
                index_elements=["name"],
                set_={k: ins.excluded[k] for k in values if k != "name"},
                where=billing_locks.c.expires_at < now,
            ).returning(billing_locks.c.run_id)
            taken = conn.execute(stmt).first()
            if taken is None:
                row = conn.execute(select(billing_locks).where(billing_locks.c.name == self.name)).one()
                raise LockHeld(self.name, row.run_id, row.host, row.pid, row.expires_at)

    def assert_held(self, conn: Connection, now: datetime) -> None:
        """Renew the lease inside the caller's transaction; raise `LockLost` if it is gone."""
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
