"""Keep user code's background tasks from stopping the process.

asyncio re-raises ``SystemExit`` and ``KeyboardInterrupt`` out of the event loop when any task
raises them, which stops every trigger (or every slot) in the process, and then the next
triggerer that adopts the same trigger. The runtime already catches them around a trigger's
``run()`` and an operator's method; this covers the tasks such code starts on its own
(``asyncio.ensure_future(...)``), which nothing awaits.

A context variable marks user code. Tasks inherit their creator's context, so the task
factory installed here recognises every task user code starts, directly or through a
library, and turns those two exceptions into :class:`UserTaskExit` (an ``Exception``):
asyncio then only logs "Task exception was never retrieved". The runtime's own tasks are
created outside user code and are left exactly as they are.
"""

from __future__ import annotations

import asyncio
import contextvars
import weakref
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

import structlog

log = structlog.get_logger("deferrun.containment")


class TriggerCode:
    """What runs inside one trigger: its label for containment and its ids for log lines.

    One context variable carries both, so a trigger's task sets one variable instead of one
    per id (each set copies the task's context mapping).
    """

    __slots__ = ("classpath", "task_id", "trigger_id")

    def __init__(self, classpath: str, trigger_id: int, task_id: str | None) -> None:
        self.classpath, self.trigger_id, self.task_id = classpath, trigger_id, task_id

    @property
    def label(self) -> str:
        return f"trigger {self.classpath}"


_USER_CODE: contextvars.ContextVar[str | TriggerCode | None] = contextvars.ContextVar(
    "deferrun_user_code", default=None
)


def enter_trigger(code: TriggerCode) -> str | TriggerCode | None:
    """Mark what runs from here on as the code of one trigger; returns what to :func:`leave`
    to (the value before, kept instead of a Token: one object less per live trigger)."""
    before = _USER_CODE.get()
    _USER_CODE.set(code)
    return before


def leave(before: str | TriggerCode | None) -> None:
    _USER_CODE.set(before)


def current_trigger() -> TriggerCode | None:
    """The trigger whose code runs now (in its task or a task it started), if any."""
    code = _USER_CODE.get()
    return code if isinstance(code, TriggerCode) else None


def add_trigger_ids(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: a line logged from a trigger's code carries its ids."""
    code = _USER_CODE.get()
    if isinstance(code, TriggerCode):
        event_dict.setdefault("trigger_id", code.trigger_id)
        if code.task_id is not None:
            event_dict.setdefault("task_id", code.task_id)
    return event_dict


# every task started while a trigger's code ran (its own background tasks, the runtime's
# cleanup/hook tasks): the watchdog names the trigger when one of them blocks the loop
_TASK_CODE: weakref.WeakKeyDictionary[asyncio.Future[Any], TriggerCode] = (
    weakref.WeakKeyDictionary()
)


def code_of(task: asyncio.Future[Any] | None) -> TriggerCode | None:
    """The trigger whose code started ``task``, if one did."""
    if task is None:
        return None
    try:
        return _TASK_CODE.get(task)
    except TypeError:  # not weak-referenceable: a foreign task class
        return None


class UserTaskExit(Exception):
    """A task started by user code raised SystemExit or KeyboardInterrupt."""


@contextmanager
def user_code(label: str) -> Iterator[None]:
    """Mark what runs inside (and every task it starts) as ``label``'s user code."""
    token = _USER_CODE.set(label)
    try:
        yield
    finally:
        _USER_CODE.reset(token)


async def _contained(coro: Coroutine[Any, Any, Any], label: str) -> Any:
    try:
        return await coro
    except (SystemExit, KeyboardInterrupt) as exc:
        error = UserTaskExit(
            f"a background task started by {label} raised {type(exc).__name__}({exc}); "
            "it was stopped instead of the process"
        )
        # said now: asyncio's own "never retrieved" line waits for the task to be collected,
        # which never happens while user code keeps a reference to it
        log.warning("background task stopped", error=str(error))
        raise error from exc


def install(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Contain tasks started by user code on ``loop`` (the running loop by default)."""
    loop = loop or asyncio.get_running_loop()
    previous = loop.get_task_factory()
    if getattr(previous, "_deferrun_contains", False):
        return

    def factory(
        loop: asyncio.AbstractEventLoop,
        coro: Coroutine[Any, Any, Any],
        context: contextvars.Context | None = None,
    ) -> asyncio.Future[Any]:
        code = label = (context or contextvars.copy_context()).get(_USER_CODE)
        if isinstance(label, TriggerCode):
            label = label.label
        if label is not None and asyncio.iscoroutine(coro):
            coro = _contained(coro, label)
        if previous is not None:
            task = previous(loop, coro, context=context)  # type: ignore[call-arg]
        else:
            task = asyncio.Task(coro, loop=loop, context=context)
        if isinstance(code, TriggerCode):
            _TASK_CODE[task] = code
        return task

    factory._deferrun_contains = True  # type: ignore[attr-defined]
    loop.set_task_factory(factory)  # type: ignore[arg-type]
