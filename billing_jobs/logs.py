"""structlog set-up: JSON lines on stderr when it is not a terminal, console otherwise.

structlog is imported, and set up, when the first logger is asked for: a command
that logs nothing (`--help`, `status`) starts without it.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

from billing_jobs.redact import scrub_event

if TYPE_CHECKING:
    import structlog

_configured: tuple[str, bool] = ("INFO", True)
_applied = False


def configured() -> tuple[str, bool]:
    """The level and format last set by `configure` (for worker processes to follow)."""
    return _configured


def configure(level: str = "INFO", *, json: bool | None = None) -> None:
    """Send logs to stderr; results go to stdout only."""
    global _configured, _applied  # noqa: PLW0603  # one set-up per process
    as_json = (not sys.stderr.isatty()) if json is None else json
    _configured = (level, as_json)
    _applied = False
    if "structlog" in sys.modules:
        _apply()


def _apply() -> None:
    global _applied  # noqa: PLW0603  # one set-up per process
    import structlog

    level, as_json = _configured
    _applied = True
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            scrub_event,  # no database password in any log line, traceback included
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        # One write per record, its newline included: worker processes share stderr, and
        # a record and its newline written apart (`print`, unbuffered as in the image)
        # let another process's record in between them.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(**bind: object) -> structlog.typing.FilteringBoundLogger:
    return named("billing_jobs").bind(**bind)  # type: ignore[no-any-return]


def named(name: str) -> Any:
    """structlog's lazy logger `name`, set up as `configure` said (or its defaults)."""
    if not _applied:
        _apply()
    import structlog

    return structlog.get_logger(name)
