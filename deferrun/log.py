"""structlog set-up shared by every deferrun process.

Console rendering on a TTY, JSON lines otherwise. The worker binds a task's id through
structlog's contextvars; a trigger's ids come from the one context variable that marks its
code (``containment.TriggerCode``). Either way every line a task or trigger emits, including
user code calling ``self.log`` or a module logger, carries them.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Literal

import structlog

from deferrun import connections, containment, tasklogs

LogFormat = Literal["console", "json"]


def _add_pid(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    event_dict.setdefault("pid", os.getpid())
    return event_dict


def configure_logging(fmt: LogFormat | None = None, level: str = "info") -> None:
    if fmt is None:
        fmt = "console" if sys.stderr.isatty() else "json"
    level_no = logging.getLevelName(level.upper())
    if not isinstance(level_no, int):
        raise ValueError(f"unknown log level {level!r}; use debug, info, warning or error")
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        containment.add_trigger_ids,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_pid,
        connections.redact_processor,
        tasklogs.tap,
    ]
    if fmt == "json":
        processors += [
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(),
        ]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
