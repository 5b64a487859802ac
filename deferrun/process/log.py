"""structlog set-up shared by every deferrun process.

Console rendering on a TTY, JSON lines otherwise. The worker binds a task's id through
structlog's contextvars; a trigger's ids come from the one context variable that marks its
code (``containment.TriggerCode``). Either way every line a task or trigger emits, including
user code calling ``self.log`` or a module logger, carries them. The standard library's
``logging`` (ported Airflow code, asyncpg, botocore) goes through the same processors, so
its lines carry the ids, reach the task's stored log, and render in the same format.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Literal

import structlog

from deferrun.connections import redaction
from deferrun.core.fieldlog import LOG_METHODS, log_fields
from deferrun.process import containment, tasklogs

LogFormat = Literal["console", "json"]


def _add_pid(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    event_dict.setdefault("pid", os.getpid())
    return event_dict


class _StdlibHandler(logging.Handler):
    """The root handler ``configure_logging`` installs (marked so a second call replaces it).

    It prints through a structlog ``PrintLogger`` on the same stream, which holds that
    stream's one write lock: a line from a worker thread never lands inside a structlog line.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__()
        self._printer = structlog.PrintLogger(stream)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            record.getMessage()
        except Exception as exc:  # the caller's own %-args do not fit its message
            record.msg = f"{record.msg!r} (could not format it with {record.args!r}: {exc!r})"
            record.args = None
        try:
            self._printer.msg(self.format(record))
        except Exception:
            self.handleError(record)  # logging's own report on stderr, never silent


def configure_logging(fmt: LogFormat | None = None, level: str = "info") -> None:
    if fmt is None:
        fmt = "console" if sys.stderr.isatty() else "json"
    level_no = logging.getLevelName(level.upper())
    if not isinstance(level_no, int):
        raise ValueError(f"unknown log level {level!r}; use debug, info, warning or error")
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        containment.add_trigger_ids,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_pid,
        redaction.redact_processor,
    ]
    if fmt == "json":
        exceptions: list[Any] = [structlog.processors.dict_tracebacks]
        renderer: Any = structlog.processors.JSONRenderer()
    else:
        exceptions, renderer = [], structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    _route_stdlib_logging(shared, [*exceptions, tasklogs.tap, renderer], level_no)
    structlog.configure(
        processors=[*shared, tasklogs.tap, *exceptions, renderer],
        wrapper_class=_fields_logger(level_no),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


def _fields_logger(level_no: int) -> type:
    """structlog's filtering logger whose methods take any keyword as a field: ``event=``
    (structlog's own name for the message) is logged as ``event_`` instead of raising
    TypeError, for every logger of the process (a trigger's ``self.log``, a module's)."""
    base = structlog.make_filtering_bound_logger(level_no)

    def wrap(name: str) -> Any:
        inner = getattr(base, name)

        def method(*args: Any, **kw: Any) -> Any:  # args[0] is the logger: kw may hold "self"
            return inner(*args, **log_fields(name, args[1:], kw))

        method.__name__ = name
        return method

    def bind(*args: Any, **kw: Any) -> Any:
        return base.bind(*args, **log_fields("bind", ("",), kw))

    names = [n for n in dir(base) if n in LOG_METHODS]
    return type(base.__name__, (base,), {"bind": bind} | {n: wrap(n) for n in names})


def _route_stdlib_logging(shared: list[Any], last: list[Any], level_no: int) -> None:
    """Send the standard library's records through ``shared`` (ids, time, redaction) and then
    ``last`` (exception as one field, the task-log tap, the renderer), from the root logger
    only, so a record is rendered once; ``level_no`` filters them like structlog's lines."""
    handler = _StdlibHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *last],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StdlibHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level_no)
