"""What every command shares: the context object and the one clock."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import Engine

from billing_jobs.db.engine import make_engine
from billing_jobs.redact import remember_url
from billing_jobs.settings import Settings, load_settings


@dataclass
class Context:
    db_url: str = field(repr=False)  # may carry the database password
    config: str | None
    _settings: Settings | None = None
    _engine: Engine | None = None

    def __post_init__(self) -> None:
        remember_url(self.db_url)  # masked in every log line and error from the start

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config)
        return self._settings

    def close(self) -> None:
        """Close the database connections the command opened."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self.db_url)
        return self._engine


def utcnow() -> datetime:
    """The one call to the wall clock; jobs get "now" as an argument."""
    return datetime.now(UTC)


def yesterday_in(settings: Settings, now: datetime) -> date:
    return now.astimezone(settings.zone).date() - timedelta(days=1)
