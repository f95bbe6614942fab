"""structlog set-up: JSON lines on stderr when it is not a terminal, console otherwise."""

from __future__ import annotations

import logging
import sys

import structlog

from billing_jobs.redact import scrub_event

_configured: tuple[str, bool] = ("INFO", True)


def configured() -> tuple[str, bool]:
    """The level and format last set by `configure` (for worker processes to follow)."""
    return _configured


def configure(level: str = "INFO", *, json: bool | None = None) -> None:
    """Send logs to stderr; results go to stdout only."""
    global _configured  # noqa: PLW0603  # one set-up per process
    as_json = (not sys.stderr.isatty()) if json is None else json
    _configured = (level, as_json)
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
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(**bind: object) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger("billing_jobs").bind(**bind)  # type: ignore[no-any-return]
