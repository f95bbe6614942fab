"""The failures the command line turns into one line and an exit status, defined
apart from the modules that raise them so that the command line can catch them
without importing those modules (start-up time)."""

from __future__ import annotations

from datetime import datetime


class SettingsError(ValueError):
    """A bad settings file or value; the message names the key."""


class DatabaseUrlError(ValueError):
    """A database URL that SQLAlchemy cannot use."""


class LockHeld(RuntimeError):
    """Another run holds the lock."""

    def __init__(self, name: str, run_id: str, host: str, pid: int, since: datetime | None):
        self.name, self.run_id, self.host, self.pid, self.since = name, run_id, host, pid, since
        when = f" since {since:%Y-%m-%d %H:%M:%S} UTC" if since is not None else ""
        super().__init__(f"another run holds the lock '{name}' (run {run_id} on {host}, pid {pid}){when}")


class LockLost(RuntimeError):
    """This run no longer holds its lock: its lock session ended or another run took it over."""
