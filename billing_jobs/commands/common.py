"""What every command shares: the context object, the one clock, export options.

Light at import (no SQLAlchemy, no settings model): the engine and the settings are
made, and their modules imported, when a command first asks for them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, TypeVar

import click

from billing_jobs.redact import remember_url

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from billing_jobs.settings import Settings


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
            from billing_jobs.settings import load_settings

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
            from billing_jobs.db.engine import make_engine

            self._engine = make_engine(self.db_url)
        return self._engine


def utcnow() -> datetime:
    """The one call to the wall clock; jobs get "now" as an argument."""
    return datetime.now(UTC)


def yesterday_in(settings: Settings, now: datetime) -> date:
    return now.astimezone(settings.zone).date() - timedelta(days=1)


F = TypeVar("F", bound=Callable[..., object])


def export_options(command: F) -> F:
    """`--output F` and `--format csv|parquet` of an export command (docs/exports.md)."""
    command = click.option(
        "--format",
        "fmt",
        type=click.Choice(["csv", "parquet"]),
        default="csv",
        show_default=True,
        help="CSV (the contract's) or Parquet with typed columns (docs/exports.md).",
    )(command)
    return click.option(
        "--output",
        type=click.Path(dir_okay=False, writable=True),
        default=None,
        help="Write to this file instead of stdout (required for Parquet).",
    )(command)


def check_export_target(fmt: str, output: str | None) -> None:
    if fmt == "parquet" and not output:
        raise click.UsageError("--format parquet writes a file: give --output FILE")
