"""structlog configuration: once at start, contextvars first, JSON off a terminal.

Events are snake_case; ``session_id``/``message_id`` are bound per message. No
key, plaintext or token is ever passed to a logger.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog for the process (call once, at start)."""
    json_out = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer() if json_out else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        # One write per line (print writes the newline apart): the lines of processes
        # sharing a log file never run together.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> Any:
    """A lazy logger with ``component=name``: it takes the configuration in force when used."""
    return structlog.get_logger(component=name)


def enabled(level: str) -> bool:
    """Whether lines at ``level`` pass the configured filter (hot paths skip building
    the arguments of a line that would be dropped)."""
    bound = structlog.get_logger().bind()
    is_enabled = getattr(bound, "is_enabled_for", None)
    return True if is_enabled is None else bool(is_enabled(_LEVELS[level]))
