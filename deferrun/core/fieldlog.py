"""``self.log`` of operators and triggers: a structlog logger that takes any keyword as a field.

structlog names a log method's message parameter ``event``, and an operator's resume method
has a parameter named ``event`` too: ``self.log.info("done", event=event)`` is the natural line
and must log, not fail the task with a TypeError.
"""

from __future__ import annotations

from typing import Any

#: logger methods whose first parameter (after ``self``) is the message, named ``event`` by
#: structlog; ``log``/``alog`` take the level first
LOG_METHODS = frozenset(
    name
    for level in ("debug", "info", "warning", "warn", "error", "exception", "critical", "fatal")
    for name in (level, "a" + level)
) | {"msg", "amsg", "log", "alog"}


#: fields the runtime sets on every line of a task's code: which task's stored log a line
#: goes to, and its level and time. User code passing one gets it renamed (``task_id_``), so
#: it can neither move its line into another task's log nor overwrite the level or time.
RESERVED = ("task_id", "trigger_id", "level", "log_level", "timestamp", "logger")


def log_fields(
    method: str, args: tuple[Any, ...], kw: dict[str, Any], reserved: tuple[str, ...] = ()
) -> dict[str, Any]:
    """``kw`` with keywords that collide with a logger method's own parameters (``event``,
    ``self``) renamed ``event_``/``self_``, so they are stored as fields instead of raising
    TypeError (``got multiple values for argument 'event'``), and so are the ``reserved``
    ones. ``event=`` with no positional message stays structlog's keyword form of the
    message."""
    positional = 2 if method in ("log", "alog") else 1
    clashes = [k for k in ("event", "self") if k in kw and (k == "self" or len(args) >= positional)]
    clashes += [k for k in reserved if k in kw]
    if not clashes:
        return kw
    out = dict(kw)
    for key in clashes:
        out[key + "_"] = out.pop(key)
    return out


class FieldLogger:
    """``self.log``: a structlog logger that takes any keyword as a field, ``event=`` too.

    structlog names its message parameter ``event``, so the natural line in a resume method,
    ``self.log.info("done", event=event)``, would fail the task with a TypeError; here it
    logs the payload as the field ``event_``."""

    __slots__ = ("_logger",)

    def __init__(self, logger: Any) -> None:
        self._logger = logger

    def bind(self, **kw: Any) -> FieldLogger:
        return FieldLogger(self._logger.bind(**log_fields("bind", ("",), kw, RESERVED)))

    def new(self, **kw: Any) -> FieldLogger:
        return FieldLogger(self._logger.new(**log_fields("new", ("",), kw, RESERVED)))

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._logger, name)
        if name not in LOG_METHODS:
            return attr

        def method(*args: Any, **kw: Any) -> Any:
            return attr(*args, **log_fields(name, args, kw, RESERVED))

        return method
