"""Badly written triggers (every way we know a trigger can misbehave) and the operator that
defers on them, for tests/triggerer/test_hostile_triggers.py. Each must fail only its own task."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import anyio

from deferrun import BaseOperator, BaseTrigger, Context, TriggerEvent
from triggers.time import DateTimeTrigger


class UntilTrigger(BaseTrigger):
    """A well-behaved run()-based trigger: fires at epoch second ``at``."""

    def __init__(self, at: float) -> None:
        self.at = at

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while (left := self.at - time.time()) > 0:
            await anyio.sleep(left)
        yield TriggerEvent(self.at)


class CoroutineRun(BaseTrigger):
    async def run(self):  # type: ignore[no-untyped-def, override]
        return TriggerEvent("never")


class FunctionRun(BaseTrigger):
    def run(self):  # type: ignore[no-untyped-def, override]
        return TriggerEvent("never")


class SyncGeneratorRun(BaseTrigger):
    def run(self):  # type: ignore[no-untyped-def, override]
        yield TriggerEvent("never")


class Silent(BaseTrigger):
    async def run(self) -> AsyncIterator[TriggerEvent]:
        if False:
            yield TriggerEvent(None)


class NotAnEvent(BaseTrigger):
    async def run(self):  # type: ignore[no-untyped-def, override]
        yield {"status": "done"}


class SocketPayload(BaseTrigger):
    async def run(self) -> AsyncIterator[TriggerEvent]:
        self.sock = socket.socket()
        yield TriggerEvent(self.sock)

    async def cleanup(self) -> None:
        if getattr(self, "sock", None) is not None:
            self.sock.close()


class Oversized(BaseTrigger):
    def __init__(self, megabytes: int = 3) -> None:
        self.megabytes = megabytes

    async def run(self) -> AsyncIterator[TriggerEvent]:
        yield TriggerEvent("x" * (self.megabytes * 1024 * 1024))


class Raises(BaseTrigger):
    """Raises ``kind``: an Exception, SystemExit, KeyboardInterrupt, CancelledError, ..."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    async def run(self) -> AsyncIterator[TriggerEvent]:
        await anyio.sleep(0.01)
        match self.kind:
            case "exception":
                raise RuntimeError("hostile trigger exploded")
            case "system_exit":
                raise SystemExit(3)
            case "keyboard_interrupt":
                raise KeyboardInterrupt
            case "cancelled":
                raise asyncio.CancelledError
            case "generator_exit":
                raise GeneratorExit
        yield TriggerEvent(None)


class Blocks(BaseTrigger):
    """Blocks the event loop once for ``seconds``, then waits forever."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def run(self) -> AsyncIterator[TriggerEvent]:
        await anyio.sleep(0.05)
        time.sleep(self.seconds)
        await anyio.sleep_forever()
        yield TriggerEvent(None)


class InitRaises(BaseTrigger):
    """Builds fine in the worker; the stored kwargs make the triggerer's rebuild raise."""

    def __init__(self, explode: bool = False) -> None:
        if explode:
            raise ValueError("InitRaises cannot be rebuilt")
        self.explode = explode

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return "tests.support.hostile_userland.InitRaises", {"explode": True}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        yield TriggerEvent(None)


class BadTimer(BaseTrigger):
    """``timer()`` raises, or returns NaN, infinity or a string as its moment."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def timer(self) -> tuple[float, Any] | None:
        match self.kind:
            case "raises":
                raise ZeroDivisionError("timer exploded")
            case "nan":
                return float("nan"), None
            case "inf":
                return float("inf"), None
        return "soon", None  # type: ignore[return-value]

    async def run(self) -> AsyncIterator[TriggerEvent]:
        yield TriggerEvent(None)


class BadCleanup(BaseTrigger):
    """Waits forever; its cleanup() raises or never returns (``hang``)."""

    def __init__(self, hang: bool = False) -> None:
        self.hang = hang

    async def run(self) -> AsyncIterator[TriggerEvent]:
        await anyio.sleep_forever()
        yield TriggerEvent(None)

    async def cleanup(self) -> None:
        if self.hang:
            await anyio.sleep_forever()
        raise RuntimeError("cleanup exploded")


class CleanupIgnoresCancel(BaseTrigger):
    """Waits forever; its cleanup() swallows every cancellation and never returns."""

    async def run(self) -> AsyncIterator[TriggerEvent]:
        await anyio.sleep_forever()
        yield TriggerEvent(None)

    async def cleanup(self) -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue


class BackgroundExit(BaseTrigger):
    """Starts a task of its own that raises SystemExit (nothing awaits it), then fails."""

    async def run(self) -> AsyncIterator[TriggerEvent]:
        async def boom() -> None:
            raise SystemExit(9)

        self._task = asyncio.ensure_future(boom())
        await asyncio.sleep(0.3)
        raise RuntimeError("failed after a background SystemExit")
        yield TriggerEvent(None)


class _BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ of the exception itself raises")


class InitBadStr(BaseTrigger):
    """Its rebuild raises an exception that cannot even be printed."""

    def __init__(self, explode: bool = False) -> None:
        if explode:
            raise _BadStr()
        self.explode = explode

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return "tests.support.hostile_userland.InitBadStr", {"explode": True}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        yield TriggerEvent(None)


class Placeholder(BaseTrigger):
    """Never fires; tests rewrite its stored row (classpath, kwargs, deadline)."""

    def __init__(self) -> None:
        self.placeholder = True

    async def run(self) -> AsyncIterator[TriggerEvent]:
        await anyio.sleep_forever()
        yield TriggerEvent(None)


def make_trigger(kind: str, at: float) -> BaseTrigger:
    simple: dict[str, Any] = {
        "coroutine_run": CoroutineRun,
        "function_run": FunctionRun,
        "sync_generator_run": SyncGeneratorRun,
        "silent": Silent,
        "not_an_event": NotAnEvent,
        "socket_payload": SocketPayload,
        "oversized": Oversized,
        "init_raises": InitRaises,
        "init_bad_str": InitBadStr,
        "background_exit": BackgroundExit,
        "cleanup_ignores_cancel": CleanupIgnoresCancel,
        "placeholder": Placeholder,
    }
    if kind in simple:
        return simple[kind]()  # type: ignore[no-any-return]
    if kind == "good_timer":
        return DateTimeTrigger(moment=datetime.fromtimestamp(at, UTC))
    if kind == "good_run":
        return UntilTrigger(at=at)
    if kind.startswith("raise_"):
        return Raises(kind=kind.removeprefix("raise_"))
    if kind.startswith("timer_"):
        return BadTimer(kind=kind.removeprefix("timer_"))
    if kind == "blocks":
        return Blocks(seconds=0.5)
    if kind in ("cleanup_raises", "cleanup_hangs"):
        return BadCleanup(hang=kind == "cleanup_hangs")
    raise ValueError(f"unknown kind {kind!r}")


class HostileDefer(BaseOperator):
    """Defers on the trigger ``kind``; on resume records when (and appends to ``record``)."""

    def __init__(
        self,
        *,
        kind: str,
        at: float = 0.0,
        timeout: float | None = None,
        record: str | None = None,
        runs: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.runs = runs
        self.kind = kind
        self.at = at
        self.timeout = timeout
        self.record = record

    def execute(self, context: Context) -> Any:
        if self.kind in ("count", "count_never"):
            assert self.runs is not None
            trigger: BaseTrigger = CountRuns(path=self.runs, fire=self.kind == "count")
        else:
            trigger = make_trigger(self.kind, self.at)
        self.defer(trigger=trigger, method_name="resume", timeout=self.timeout)

    def resume(self, context: Context, event: Any = None) -> Any:
        now = time.time()
        if self.record:
            with open(self.record, "a") as f:
                f.write(f"{context['task_id']} {now} {os.getpid()}\n")
        return {"resumed_at": now, "late": now - self.at}


class CountRuns(BaseTrigger):
    """Appends a line to ``path`` each time run() starts, then fires at once (or never)."""

    def __init__(self, path: str, fire: bool = True) -> None:
        self.path = path
        self.fire = fire

    async def run(self) -> AsyncIterator[TriggerEvent]:
        with open(self.path, "a") as f:
            f.write(f"{self.trigger_id} {self.task_id}\n")
        if not self.fire:
            await anyio.sleep_forever()
        yield TriggerEvent({"trigger_id": self.trigger_id, "task_id": self.task_id})


class _AwaitableSteps:
    """An async iterator (not a generator) whose ``__anext__`` returns ``kind`` of awaitable."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __aiter__(self) -> _AwaitableSteps:
        return self

    def __anext__(self) -> Any:
        loop = asyncio.get_running_loop()
        event = TriggerEvent({"via": self.kind})
        if self.kind == "future":
            future = loop.create_future()
            loop.call_later(0.01, future.set_result, event)
            return future
        if self.kind == "task":

            async def later() -> TriggerEvent:
                await asyncio.sleep(0.01)
                return event

            return loop.create_task(later())
        if self.kind == "await":

            class Awaitable:
                def __await__(self) -> Any:
                    yield from asyncio.sleep(0.01).__await__()
                    return event

            return Awaitable()
        return 42  # not awaitable at all


class AwaitablesRun(BaseTrigger):
    """run() returns an async iterator whose steps are Futures, Tasks or __await__ objects,
    all of which ``async for`` accepts."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def run(self) -> Any:  # type: ignore[override]
        return _AwaitableSteps(self.kind)
