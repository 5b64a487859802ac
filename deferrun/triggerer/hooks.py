"""Calls into a trigger's code outside its run() steps: ``cleanup()``, ``on_task_cancelled()``
and the closing of its generator. Each is bounded in time and runs in a task named after the
trigger, so a call that hangs or ignores cancellation is abandoned (and blamed by the
watchdog) instead of holding up the trigger's outcome or the triggerer's shutdown."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from deferrun.connections.redaction import format_error
from deferrun.process import containment
from deferrun.process.watchdog import LoopWatchdog

log = structlog.get_logger("deferrun.triggerer")


async def bounded(
    call: Callable[[], Awaitable[Any] | Any], timeout: float, classpath: str, what: str
) -> None:
    """Await ``call()`` in a task of its own for at most ``timeout`` s; log what goes wrong.

    A separate task, so a call that ignores cancellation is abandoned rather than holding up
    its trigger's outcome or the triggerer's shutdown; a second cancel of ours still ends the
    wait (and is re-raised afterwards).
    """

    async def call_logged() -> None:
        try:
            result = call()
            if inspect.isawaitable(result):
                await result
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            log.error(f"trigger {classpath} {what} raised", error=format_error(exc))

    # named after the trigger (``trigger:<id>:cleanup``) so the watchdog can say what ran
    code = containment.current_trigger()
    role = what.replace("()", "").replace("run() ", "").split()[-1]
    name = None if code is None else f"trigger:{code.trigger_id}:{role}"
    job = asyncio.get_running_loop().create_task(call_logged(), name=name)
    deadline = time.monotonic() + timeout
    cancelled = False
    while not job.done():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            job.cancel()
            log.error(f"trigger {classpath} {what} took longer than {timeout:g}s; abandoned")
            break
        try:
            await asyncio.wait({job}, timeout=remaining)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


async def close_generator(agen: Any, timeout: float, classpath: str) -> None:
    """``agen.aclose()``, stepped once right here: a generator with no awaiting ``finally``
    closes in that step, with no task of its own (a burst of 10,000 fires would otherwise
    start 10,000 tasks); only one that awaits goes on in ``bounded``."""
    what = "run() closing"
    closer = agen.aclose()
    began = time.monotonic()
    try:
        awaiting = closer.send(None)
    except StopIteration:
        return
    except BaseException as exc:  # the same report bounded() makes
        log.error(f"trigger {classpath} {what} raised", error=format_error(exc))
        return
    finally:
        _timed_close(time.monotonic() - began)
    await bounded(lambda: _Resumed(closer, awaiting), timeout, classpath, what)


def _timed_close(seconds: float) -> None:
    """The step that ran the finally of a trigger's run() is not one of run()'s own timed
    steps: report it to the watchdog when it blocked the loop."""
    dog = LoopWatchdog.of_running_loop()
    code = containment.current_trigger()
    if dog is None or seconds <= dog.threshold or code is None:
        return
    details = {"trigger_id": code.trigger_id, "task_id": code.task_id, "trigger": code.classpath}
    dog.note_current_step(seconds, None, {**details, "ran": "the finally of its run()"})


class _Resumed:
    """Awaits the rest of a coroutine already stepped once (``first`` is what it yielded)."""

    def __init__(self, coro: Any, first: Any) -> None:
        self.coro, self.first = coro, first

    def __await__(self) -> Any:
        value = self.first
        while True:
            try:
                sent = yield value
            except BaseException as exc:
                try:
                    value = self.coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    value = self.coro.send(sent)
                except StopIteration:
                    return
