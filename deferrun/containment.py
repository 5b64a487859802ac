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
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

import structlog

log = structlog.get_logger("deferrun.containment")

_USER_CODE: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "deferrun_user_code", default=None
)


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
        label = (context or contextvars.copy_context()).get(_USER_CODE)
        if label is not None and asyncio.iscoroutine(coro):
            coro = _contained(coro, label)
        if previous is not None:
            return previous(loop, coro, context=context)  # type: ignore[call-arg]
        return asyncio.Task(coro, loop=loop, context=context)

    factory._deferrun_contains = True  # type: ignore[attr-defined]
    loop.set_task_factory(factory)  # type: ignore[arg-type]
