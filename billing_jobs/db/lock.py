"""The run lock: held while the run lives, free the moment its process dies.

A row in `billing_locks` per held lock says who holds it (run, host, pid, since
when). What makes the lock held differs by back end; see `docs/locks.md`.

PostgreSQL: session advisory locks on a connection of its own, kept open for the
whole run (`Lease.acquire` .. `Lease.release`). The server releases them when
that session ends, so a killed run frees its lock at once; no clocks are
compared. The row is information only. Keys (`lock_key`, a hash of the name):

- a whole run holds `billing-writer` exclusively;
- a shard `billing-writer/shard-I-of-N` holds `billing-writer` shared (so shards
  run together and exclude a whole run), its own name exclusively (one process
  per shard), and `(SPLIT_CLASS, N)` shared; it then checks in `pg_locks` that no
  shard of another split holds its `(SPLIT_CLASS, M)`.

Takers go one at a time (a transaction lock on `ACQUIRE_KEY`), so the check of
other splits cannot race. The server's TCP keepalives are set on the lock session
so that a holder whose host vanished (no FIN) is noticed within about a minute. A
taker that finds the holder's process gone (same host, see below) waits a moment
for the server to end its session.

SQLite: the row is the lock. A holder is dead when it ran on this host, in this
pid namespace, and its pid is gone or is another process now (the start time
recorded in `process_key` differs); such a lock is taken over at once. Otherwise
the row is a lease of `[lock] lease_seconds`, renewed by a heartbeat thread of
the holder and by each of its write transactions, and compared with the
database's clock (`julianday('now')`), never a host's. A holder known to be alive
on this host keeps its lock even past its lease.

Fencing: every write transaction proves the lock is still the run's
(`assert_held`), so a run that lost it commits nothing more. The token is the
run's id on the lock's row: a takeover replaces the row, and a write finds its
own id there or fails. Both back ends also fail a write when the row's process
(the run's own, whose pid and start time it records) has died on this host, so
the workers of a killed run cannot write in the moments before a takeover.
PostgreSQL: the transaction holds `GUARD_KEY` shared, then finds the run's lock
session holding its key in `pg_locks` and the run's row in `billing_locks`. A
taker that clears a dead holder's row takes `GUARD_KEY` exclusively first, so it
waits for writes still in flight before it goes on. SQLite: the write
transaction renews the run's row, at its start and just before it commits; the
database's single write lock serializes it with any takeover.

Abandoned runs: the taker marks the runs of the dead holders it cleared
`abandoned` in `billing_runs`.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, insert, select, text, update

from billing_jobs import errors
from billing_jobs.db.billing_tables import billing_locks, billing_runs
from billing_jobs.logs import get_logger

WRITER_LOCK = "billing-writer"
SHARD_LOCK_PREFIX = WRITER_LOCK + "/shard-"
ACQUIRE_KEY = 0x62696C6C  # PostgreSQL: serializes lock takers (and migrations, same key)
GUARD_KEY = 0x62696C6D  # PostgreSQL: writes hold it shared; a takeover from a dead holder, exclusively
SPLIT_CLASS = 0x62696C6E  # PostgreSQL: (SPLIT_CLASS, N) held shared by the shards of split N
# PostgreSQL: the session of a holder known to have died (on this host) may hold its locks a
# few milliseconds more; a taker waits for it this long at most.
DYING_SESSION_SECONDS = 5.0
# PostgreSQL server-side keepalives of the lock session: a vanished host frees it in about a minute.
KEEPALIVES = {"tcp_keepalives_idle": 30, "tcp_keepalives_interval": 10, "tcp_keepalives_count": 3}
ABANDONED = "abandoned"


def writer_lock_name(shard_index: int | None = None, shard_count: int = 1) -> str:
    """The writer lock of a whole run, or of one shard of a sharded month-end (`I-of-N`)."""
    if shard_index is None:
        return WRITER_LOCK
    return f"{SHARD_LOCK_PREFIX}{shard_index}-of-{shard_count}"


def _shard_count(name: str) -> int | None:
    return int(name.rsplit("-of-", 1)[1]) if name.startswith(SHARD_LOCK_PREFIX) else None


def compatible(mine: str, other: str) -> bool:
    """Whether two locks may be held at once. Writer locks: shards of the same split of
    the accounts (same N, different I) may; anything else excludes the other. A lock of
    another name (`billing-reconcile`) excludes only itself."""
    if not (mine.startswith(WRITER_LOCK) and other.startswith(WRITER_LOCK)):
        return mine != other
    a, b = _shard_count(mine), _shard_count(other)
    return a is not None and a == b and mine != other


def lock_key(name: str) -> int:
    """The PostgreSQL advisory lock key (signed 64 bits) of a lock name."""
    digest = hashlib.blake2b(f"billing-jobs:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _halves(key: int) -> tuple[int, int]:
    """`pg_locks.classid` and `objid` of a 64-bit advisory key."""
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    return unsigned >> 32, unsigned & 0xFFFF_FFFF


LockHeld = errors.LockHeld


class _HolderDying(LockHeld):
    """PostgreSQL: the holder's process is gone (this host can tell) but the server has not
    ended its session yet; a taker tries again for a moment."""


LockLost = errors.LockLost


# ---------------------------------------------------------------------------
# Processes on this host
# ---------------------------------------------------------------------------


def _namespace() -> str | None:
    """This host's boot and this process's pid namespace: pids mean the same within it."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def process_key(pid: int) -> str | None:
    """What tells process `pid` of this namespace from a later one with the same pid:
    the namespace and the process's start time; None when it does not exist (or on
    a system without /proc)."""
    namespace = _namespace()
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if namespace is None or fields[0] in ("Z", "X"):  # a zombie has died already
        return None
    return f"{namespace}/{fields[19]}"


def process_alive(host: str, pid: int, key: str | None) -> bool | None:
    """Whether the process that recorded (host, pid, key) still runs: True or False
    when this process can tell (same host and pid namespace), None otherwise."""
    if not key or host != socket.gethostname():
        return None
    namespace, _, _started = key.rpartition("/")
    if namespace != _namespace():
        return None
    return process_key(pid) == key


# ---------------------------------------------------------------------------
# Who holds what
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Holder:
    """A row of `billing_locks`, and whether its holder is alive."""

    name: str
    run_id: str
    host: str
    pid: int
    acquired_at: datetime
    expires_at: datetime | None
    session_pid: int | None
    process_key: str | None
    alive: bool

    def process_alive(self) -> bool | None:
        """Whether its process runs, when this host can tell (see `process_alive`)."""
        return process_alive(self.host, self.pid, self.process_key)


def _sqlite_expiry(seconds: int) -> Any:
    """The database's clock plus `seconds`, stored as SQLAlchemy stores datetimes on SQLite."""
    return func.strftime("%Y-%m-%d %H:%M:%f", "now", f"+{seconds} seconds").concat("000")


def _advisory_held(conn: Connection) -> set[tuple[int, int, int]]:
    """(session pid, classid, objid) of every exclusive 64-bit advisory lock of this database."""
    rows = conn.execute(
        text(
            "SELECT pid, classid::bigint, objid::bigint FROM pg_locks "
            "WHERE locktype = 'advisory' AND objsubid = 1 AND granted AND mode = 'ExclusiveLock' "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
    )
    return {(int(pid), int(hi), int(lo)) for pid, hi, lo in rows}


def read_holders(conn: Connection) -> list[Holder]:
    """Every row of `billing_locks`, by name, each with whether its holder is alive."""
    lk = billing_locks.c
    if conn.dialect.name == "postgresql":
        held = _advisory_held(conn)
        rows = conn.execute(select(billing_locks).order_by(lk.name)).all()
        return [
            _holder(r, r.session_pid is not None and (r.session_pid, *_halves(lock_key(r.name))) in held)
            for r in rows
        ]
    leased = (func.julianday(lk.expires_at) > func.julianday("now")).label("leased")
    rows = conn.execute(select(billing_locks, leased).order_by(lk.name)).all()
    out = []
    for r in rows:
        holder = _holder(r, bool(r.leased))
        known = holder.process_alive()
        out.append(holder if known is None else replace(holder, alive=known))
    return out


def _holder(row: Any, alive: bool) -> Holder:
    return Holder(
        row.name,
        row.run_id,
        row.host,
        row.pid,
        row.acquired_at,
        row.expires_at,
        row.session_pid,
        row.process_key,
        alive,
    )


# ---------------------------------------------------------------------------
# The lease of one run
# ---------------------------------------------------------------------------


@dataclass
class Lease:
    """One run's hold on a writer lock. Worker processes of the run make a Lease with
    the same values (and `session_pid`) to prove the lock in their own writes."""

    engine: Engine
    name: str
    run_id: str
    host: str
    pid: int
    seconds: int  # SQLite: the lease the heartbeat renews
    session_pid: int | None = None  # PostgreSQL: the backend holding the advisory locks
    _session: Connection | None = field(default=None, init=False, repr=False, compare=False)
    _heartbeat: _Heartbeat | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def postgresql(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def spec(self) -> tuple[str, str, str, int, int, int | None]:
        """The values a worker process needs (picklable)."""
        return self.name, self.run_id, self.host, self.pid, self.seconds, self.session_pid

    def acquire(self, now: datetime) -> None:
        """Take the lock or raise `LockHeld`; clears locks of dead holders and marks
        their runs abandoned. `now` (naive UTC) is recorded as the time taken."""
        if self.postgresql:
            self._acquire_postgresql(now)
        else:
            self._acquire_sqlite(now)

    # --- SQLite ---------------------------------------------------------------

    def _acquire_sqlite(self, now: datetime) -> None:
        with self.engine.begin() as conn:
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # the database's write lock from the start
            dead = self._check_holders(conn)
            self._clear(conn, dead, now)
            self._record(conn, now, expires_at=_sqlite_expiry(self.seconds))
        self._heartbeat = _Heartbeat(self)
        self._heartbeat.start()

    def _record(self, conn: Connection, now: datetime, **how: Any) -> None:
        """The row saying who holds the lock (`how`: what tells whether it lives)."""
        mine = (self.host, self.pid) == (socket.gethostname(), os.getpid())
        conn.execute(
            insert(billing_locks).values(
                name=self.name,
                run_id=self.run_id,
                host=self.host,
                pid=self.pid,
                acquired_at=now,
                process_key=process_key(self.pid) if mine else None,
                **how,
            )
        )

    def _check_holders(self, conn: Connection) -> list[Holder]:
        """Raise `LockHeld` for a live holder excluding this lock; return the dead holders."""
        holders = read_holders(conn)
        for h in holders:
            if h.alive and (h.name == self.name or not compatible(self.name, h.name)):
                raise LockHeld(h.name, h.run_id, h.host, h.pid, h.acquired_at)
        return [h for h in holders if not h.alive]

    def _clear(self, conn: Connection, dead: list[Holder], now: datetime) -> None:
        """Delete the rows of dead holders; their runs still `running` become `abandoned`."""
        if not dead:
            return
        conn.execute(delete(billing_locks).where(billing_locks.c.name.in_([h.name for h in dead])))
        for h in dead:
            conn.execute(
                update(billing_runs)
                .where(billing_runs.c.run_id == h.run_id, billing_runs.c.status == "running")
                .values(
                    status=ABANDONED,
                    finished_at=now,
                    error=(
                        f"abandoned: its process (pid {h.pid} on {h.host}) died holding the lock "
                        f"'{h.name}'; found by run {self.run_id}"
                    ),
                )
            )

    def _renew(self, conn: Connection) -> None:
        lk = billing_locks.c
        renewed = conn.execute(
            update(billing_locks)
            .where(lk.name == self.name, lk.run_id == self.run_id)
            .values(expires_at=_sqlite_expiry(self.seconds))
            .returning(lk.host, lk.pid, lk.process_key)
        ).first()
        if renewed is None:
            raise LockLost(f"lock '{self.name}' was taken over by another run; nothing committed")
        if process_alive(renewed.host, renewed.pid, renewed.process_key) is False:
            # A worker of a run whose process died: the lock is the dead process's, not its workers'.
            raise LockLost(
                f"lock '{self.name}' belongs to a run whose process has died (pid {renewed.pid}); "
                "nothing committed"
            )

    # --- PostgreSQL -----------------------------------------------------------

    def _acquire_postgresql(self, now: datetime) -> None:
        deadline = time.monotonic() + DYING_SESSION_SECONDS
        session = self.engine.connect()
        try:
            with session.begin():
                for setting, value in KEEPALIVES.items():
                    session.execute(text(f"SET {setting} = {int(value)}"))
                if int(session.execute(text("SHOW server_version_num")).scalar_one()) >= 140000:
                    session.execute(text("SET idle_session_timeout = 0"))
                self.session_pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
            while True:
                try:
                    with session.begin():
                        self._take_postgresql(session, now)
                    self._session = session
                    return
                except _HolderDying:
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(0.1)
        except BaseException:
            session.invalidate()  # ends the session: whatever it took is free again
            session.close()
            self.session_pid = None
            raise

    def _take_postgresql(self, session: Connection, now: datetime) -> None:
        """One attempt, in one transaction of the lock session: the advisory locks, then the row."""
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ACQUIRE_KEY})
        if not self._try_advisory(session):
            session.execute(text("SELECT pg_advisory_unlock_all()"))
            live = [h for h in read_holders(session) if h.alive]
            for h in live:
                if h.name == self.name or not compatible(self.name, h.name):
                    held = _HolderDying if h.process_alive() is False else LockHeld
                    raise held(h.name, h.run_id, h.host, h.pid, h.acquired_at)
            raise LockHeld(self.name, "unknown", "unknown", 0, None)
        # A row naming this session but another run is a dead holder's whose backend pid was reused.
        dead = [
            h
            for h in read_holders(session)
            if not h.alive or (h.session_pid == self.session_pid and h.run_id != self.run_id)
        ]
        if dead:
            # Writes of a dead holder still in flight (its workers) commit before this run goes on.
            session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": GUARD_KEY})
        self._clear(session, dead, now)
        self._record(session, now, session_pid=self.session_pid)

    def _try_advisory(self, session: Connection) -> bool:
        def try_lock(sql: str, **keys: int) -> bool:
            return bool(session.execute(text(f"SELECT {sql}"), keys).scalar_one())

        count = _shard_count(self.name)
        if count is None:
            return try_lock("pg_try_advisory_lock(:k)", k=lock_key(self.name))
        if not (
            try_lock("pg_try_advisory_lock_shared(:k)", k=lock_key(WRITER_LOCK))
            and try_lock("pg_try_advisory_lock(:k)", k=lock_key(self.name))
            and try_lock("pg_try_advisory_lock_shared(:c, :n)", c=SPLIT_CLASS, n=count)
        ):
            return False
        other_split = session.execute(
            text(
                "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 AND granted "
                "AND classid::bigint = :c AND objid::bigint <> :n "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ),
            {"c": SPLIT_CLASS, "n": count},
        ).first()
        return other_split is None

    # --- Every write transaction ----------------------------------------------

    def assert_held(self, conn: Connection) -> None:
        """Prove, inside the caller's write transaction, that the lock is still this run's;
        raise `LockLost` if not. SQLite also renews the lease here."""
        if not self.postgresql:
            self._renew(conn)
            return
        conn.execute(text("SELECT pg_advisory_xact_lock_shared(:k)"), {"k": GUARD_KEY})
        alive = (self.session_pid, *_halves(lock_key(self.name))) in _advisory_held(conn)
        lk = billing_locks.c
        mine = conn.execute(
            select(lk.host, lk.pid, lk.process_key).where(
                lk.name == self.name, lk.run_id == self.run_id, lk.session_pid == self.session_pid
            )
        ).first()
        if mine is not None and process_alive(mine.host, mine.pid, mine.process_key) is False:
            mine = None  # a worker of a run whose process died, in the moment before its session ends
        if not alive or mine is None:
            raise LockLost(
                f"lock '{self.name}' is no longer held by this run (its lock session ended "
                "or another run took it over); nothing committed"
            )

    def before_commit(self, conn: Connection) -> None:
        """SQLite: renew the lease again at the end of a write transaction, so that a long
        transaction does not leave it expired when the database's write lock is let go."""
        if not self.postgresql:
            self._renew(conn)

    def release(self) -> None:
        """Give the lock back (never raises once the lock is gone anyway)."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        mine = delete(billing_locks).where(
            billing_locks.c.name == self.name, billing_locks.c.run_id == self.run_id
        )
        session, self._session = self._session, None
        if session is not None:
            try:
                with session.begin():
                    session.execute(mine)
                session.execute(text("SELECT pg_advisory_unlock_all()"))
                session.commit()
                return
            except Exception as exc:  # the session had ended: its locks went with it
                first = (str(exc).strip().splitlines() or [""])[0]
                get_logger().warning("lock.session_gone", lock=self.name, run_id=self.run_id, error=first)
            finally:
                if not session.invalidated:
                    session.invalidate()  # the session ends: nothing of it outlives the run
                session.close()
        with self.engine.begin() as conn:
            conn.execute(mine)


class _Heartbeat(threading.Thread):
    """SQLite: renews a lease every quarter of its length, on the database's clock,
    for as long as the run's process lives (computing or writing)."""

    def __init__(self, lease: Lease) -> None:
        super().__init__(name=f"lock-heartbeat-{lease.run_id}", daemon=True)
        self.lease = lease
        self.interval = max(lease.seconds / 4, 0.5)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                with self.lease.engine.begin() as conn:
                    self.lease._renew(conn)
            except LockLost:
                return  # taken over: the run's next write raises LockLost
            except Exception as exc:  # the database busy for long; try again at the next beat
                get_logger().warning("lock.heartbeat_failed", lock=self.lease.name, error=str(exc))

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=self.interval + 65)
