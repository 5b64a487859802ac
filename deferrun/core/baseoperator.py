"""BaseOperator: the unit of work a worker runs, and the API to defer it.

Operators are stored as (classpath, constructor kwargs), exactly like triggers, so a task can
be rebuilt on any worker after a deferral, a retry or a crash.
"""

from __future__ import annotations

import difflib
import inspect
import math
from datetime import timedelta
from typing import Any, ClassVar

import structlog

from deferrun.core.basetrigger import BaseTrigger, capture_init_kwargs, replayable_kwargs
from deferrun.core.classpaths import classpath_of
from deferrun.core.fieldlog import FieldLogger
from deferrun.exceptions import FailTask, TaskDeferred, TaskTimeout, TriggerFailed

Context = dict[str, Any]

DEFAULT_QUEUE = "default"


#: the longest duration accepted anywhere (retry delay, timeouts, intervals): 100 years
MAX_SECONDS = 100 * 365.25 * 86400
MAX_RETRIES = 10_000


def as_seconds(value: timedelta | float | int | None, name: str) -> float | None:
    """A duration in seconds, refusing what no clock can wait for (negative, NaN, infinite,
    or longer than 100 years)."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
    else:
        raise TypeError(f"{name} must be a timedelta or a number of seconds, not {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{name} must be a finite, non-negative number of seconds, got {value!r}")
    if seconds > MAX_SECONDS:
        raise ValueError(
            f"{name} of {value!r} is longer than 100 years; give a shorter duration or None"
        )
    return seconds


class BaseOperator:
    """Subclass and implement ``execute(context)`` (sync or ``async def``).

    To wait for something outside, call ``self.defer(trigger=..., method_name=...)``: the worker
    slot is freed at once, and the task resumes on some worker as
    ``self.<method_name>(context, event=payload, **kwargs)`` when the trigger fires.
    """

    _init_kwargs: dict[str, Any]
    #: internal resume methods used when the wait itself failed
    TRIGGER_FAILED_METHOD: ClassVar[str] = "__trigger_failed__"
    DEFERRAL_TIMEOUT_METHOD: ClassVar[str] = "__deferral_timeout__"
    #: a task submitted with a start trigger runs ``execute`` once it fires
    START_METHOD: ClassVar[str] = "__start__"

    def __new__(cls, *args: Any, **kwargs: Any) -> BaseOperator:
        self = super().__new__(cls)
        self._init_kwargs = capture_init_kwargs(cls, args, kwargs)
        return self

    def __init__(
        self,
        *,
        task_id: str | None = None,
        retries: int = 0,
        retry_delay: timedelta | float = timedelta(minutes=5),
        execution_timeout: timedelta | float | None = None,
        queue: str = DEFAULT_QUEUE,
    ) -> None:
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValueError(f"retries must be a non-negative int, got {retries!r}")
        if retries > MAX_RETRIES:
            raise ValueError(f"retries must be at most {MAX_RETRIES:,}, got {retries:,}")
        if not isinstance(queue, str) or not queue or "\x00" in queue:
            raise ValueError(f"queue must be a non-empty string without NUL, got {queue!r}")
        if task_id is not None and (not isinstance(task_id, str) or "\x00" in task_id):
            raise ValueError(f"task_id must be a string without NUL, got {task_id!r}")
        self.task_id = task_id or type(self).__name__
        self.retries = retries
        self.retry_delay = as_seconds(retry_delay, "retry_delay") or 0.0
        self.execution_timeout = as_seconds(execution_timeout, "execution_timeout")
        self.queue = queue

    #: start each task of this operator from its start_trigger() (Airflow's start_from_trigger)
    start_from_trigger: ClassVar[bool] = False

    # -- authoring API ----------------------------------------------------------------------

    def start_trigger(self) -> BaseTrigger | None:
        """The trigger to wait on before the first try when ``start_from_trigger`` is set;
        ``execute`` then runs with its event as ``context["trigger_event"]``."""
        return None

    def execute(self, context: Context) -> Any:
        """The task's work, in a worker slot. Return its result (stored as JSON), or call
        ``self.defer(...)`` to free the slot until a trigger fires; ``async def`` works too."""
        raise NotImplementedError(f"{type(self).__qualname__} must implement execute(context)")

    def execute_complete(self, context: Context, event: Any = None) -> Any:
        """Default resume method: the task's result is the trigger's event payload."""
        return event

    def defer(
        self,
        *,
        trigger: BaseTrigger,
        method_name: str = "execute_complete",
        kwargs: dict[str, Any] | None = None,
        timeout: timedelta | float | None = None,
    ) -> None:
        """Free this worker slot and wait for ``trigger`` in the triggerer."""
        if not isinstance(trigger, BaseTrigger):
            raise TypeError(f"defer(trigger=...) needs a BaseTrigger, got {trigger!r}")
        self._check_resume_method(method_name, kwargs)
        raise TaskDeferred(trigger=trigger, method_name=method_name, kwargs=kwargs, timeout=timeout)

    def _check_resume_method(self, method_name: Any, kwargs: Any = None) -> None:
        """Refuse a ``method_name`` the worker could not resume with, in the attempt that
        defers (FailTask: a typo is not worth a retry), rather than when the trigger fires,
        possibly hours later: one that does not exist, is not callable, or cannot be called
        as the worker calls it, ``method(context, event=payload, **kwargs)``."""
        if not isinstance(method_name, str) or not method_name:
            raise FailTask(f"defer(method_name=...) must be a method's name, got {method_name!r}")
        cls = type(self)
        if method_name.startswith("_"):
            why = "names starting with '_' are not resumed with; use a public method"
        elif callable(method := getattr(self, method_name, None)):
            _check_resume_signature(cls, method_name, method, kwargs)
            return
        elif hasattr(self, method_name):
            why = f"{cls.__qualname__}.{method_name} is not callable"
        else:
            why = f"{cls.__qualname__} has no method {method_name!r}"
        names = [  # looked up on the class: listing the candidates runs no property
            n
            for n in dir(cls)
            if not n.startswith("_") and callable(inspect.getattr_static(cls, n, None))
        ]
        close = difflib.get_close_matches(method_name.lstrip("_"), names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise FailTask(f"defer(method_name={method_name!r}): {why}{hint}")

    # -- hooks for a failed wait; sensors override these (soft_fail) ---------------------------

    def on_deferral_timeout(self, context: Context, event: Any = None) -> Any:
        """Called on a worker, instead of the resume method, when a deferral's ``timeout``
        passed before its trigger fired; ``event`` is ``{"error": reason}``. By default the
        task fails with TaskTimeout (retried as its ``retries`` allow); override it to end the
        task another way or to defer again."""
        raise TaskTimeout(event.get("error") if isinstance(event, dict) else "deferral timed out")

    def on_trigger_failed(self, context: Context, event: Any = None) -> Any:
        """Called on a worker, instead of the resume method, when the trigger raised or broke
        its contract; ``event`` is ``{"error": message with traceback}``. By default the task
        fails with TriggerFailed (retried as its ``retries`` allow); override it to recover."""
        raise TriggerFailed(event.get("error") if isinstance(event, dict) else "trigger failed")

    # -- plumbing -----------------------------------------------------------------------------

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return classpath_of(type(self)), replayable_kwargs(self, "operator")

    @property
    def log(self) -> Any:
        # Unbound on purpose: the worker binds task_id etc. in contextvars for the running task.
        return FieldLogger(structlog.get_logger(f"operator.{type(self).__qualname__}"))

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} task_id={self.task_id!r}>"


def _check_resume_signature(cls: type, name: str, method: Any, kwargs: Any) -> None:
    """FailTask when ``method`` cannot take ``(context, event=..., **kwargs)``: ``execute``
    or ``defer`` named by mistake failed with a TypeError only once the trigger fired."""
    try:
        signature = inspect.signature(method)
    except (TypeError, ValueError):  # a builtin or an odd callable: nothing to check
        return
    extra = kwargs if isinstance(kwargs, dict) else {}
    try:
        signature.bind({}, event=None, **{str(k): v for k, v in extra.items()})
    except TypeError as exc:
        raise FailTask(
            f"defer(method_name={name!r}): the worker resumes with "
            f"{cls.__qualname__}.{name}(context, event=payload"
            f"{', ' + ', '.join(map(str, extra)) if extra else ''}), which its signature "
            f"{signature} does not take ({exc}); give the resume method an event=None "
            "parameter"
        ) from None
