"""Operators and triggers a user would write, for the in-process tests (importable by path)."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio

from deferrun import BaseOperator, BaseTrigger, Context, FailTask, SkipTask, TriggerEvent
from deferrun.sensors import BaseSensor


class EchoTrigger(BaseTrigger):
    """Fires after ``delay`` seconds with ``value``."""

    def __init__(self, value: Any, delay: float = 0.0) -> None:
        self.value = value
        self.delay = delay

    async def run(self) -> AsyncIterator[TriggerEvent]:
        await anyio.sleep(self.delay)
        yield TriggerEvent(self.value)


class AirflowStyleTrigger(BaseTrigger):
    """Ported from Airflow: explicit serialize(), positional constructor."""

    def __init__(self, name, delay=0.0):  # type: ignore[no-untyped-def]
        super().__init__()
        self.name = name
        self.delay = delay

    def serialize(self):  # type: ignore[no-untyped-def]
        return (
            "tests.support.userland.AirflowStyleTrigger",
            {"name": self.name, "delay": self.delay},
        )

    async def run(self):  # type: ignore[no-untyped-def]
        await anyio.sleep(self.delay)
        yield TriggerEvent({"hello": self.name})


class RaisingTrigger(BaseTrigger):
    def __init__(self, message: str = "boom") -> None:
        self.message = message

    async def run(self) -> AsyncIterator[TriggerEvent]:
        await anyio.sleep(0.01)
        raise RuntimeError(self.message)
        yield TriggerEvent(None)


class SilentTrigger(BaseTrigger):
    """Returns without an event."""

    async def run(self) -> AsyncIterator[TriggerEvent]:
        if False:
            yield TriggerEvent(None)


class UnserializableTrigger(BaseTrigger):
    async def run(self) -> AsyncIterator[TriggerEvent]:
        yield TriggerEvent(object())


class NeverTrigger(BaseTrigger):
    """Waits forever; records cleanup in ``marker`` (a file path)."""

    def __init__(self, marker: str | None = None) -> None:
        self.marker = marker

    async def run(self) -> AsyncIterator[TriggerEvent]:
        await anyio.sleep_forever()
        yield TriggerEvent(None)

    async def cleanup(self) -> None:
        if self.marker:
            with open(self.marker, "a") as f:
                f.write(f"cleanup {self.trigger_id}\n")


class BlockingTrigger(BaseTrigger):
    """Blocks the event loop with time.sleep, then fires (a bad trigger)."""

    def __init__(self, seconds: float = 0.5) -> None:
        self.seconds = seconds

    async def run(self) -> AsyncIterator[TriggerEvent]:
        await anyio.sleep(0.05)
        time.sleep(self.seconds)
        yield TriggerEvent("blocked")


class ForgedTrigger(BaseTrigger):
    """serialize() names a function, not a trigger class: must be refused, never called."""

    def __init__(self, path: str) -> None:
        self.path = path

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("os.system", {"command": f"touch {self.path}"})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        yield TriggerEvent(None)


class DeferOnce(BaseOperator):
    """Defers on ``trigger_classpath``-like built-ins chosen by ``kind``; returns the event."""

    def __init__(
        self,
        *,
        kind: str = "echo",
        value: Any = None,
        delay: float = 0.0,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.kind = kind
        self.value = value
        self.delay = delay
        self.timeout = timeout

    def make_trigger(self) -> BaseTrigger:
        match self.kind:
            case "echo":
                return EchoTrigger(value=self.value, delay=self.delay)
            case "airflow":
                return AirflowStyleTrigger(self.value, self.delay)
            case "raise":
                return RaisingTrigger(message=str(self.value))
            case "silent":
                return SilentTrigger()
            case "unserializable":
                return UnserializableTrigger()
            case "never":
                return NeverTrigger(marker=self.value)
            case "block":
                return BlockingTrigger(seconds=self.delay)
            case "forged":
                return ForgedTrigger(path=self.value)
        raise ValueError(self.kind)

    def execute(self, context: Context) -> Any:
        self.defer(
            trigger=self.make_trigger(),
            method_name="resume",
            kwargs={"started_try": context["try_number"]},
            timeout=self.timeout,
        )

    def resume(self, context: Context, event: Any = None, started_try: int = 0) -> Any:
        return {"event": event, "started_try": started_try}


class AsyncDefer(BaseOperator):
    def __init__(self, *, value: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.value = value

    async def execute(self, context: Context) -> Any:
        await anyio.sleep(0)
        self.defer(trigger=EchoTrigger(value=self.value), method_name="done")

    async def done(self, context: Context, event: Any = None) -> Any:
        return ["async", event]


class Flaky(BaseOperator):
    """Fails until try ``succeed_on``, then returns the try number."""

    def __init__(self, *, succeed_on: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.succeed_on = succeed_on

    def execute(self, context: Context) -> Any:
        if context["try_number"] < self.succeed_on:
            raise ValueError(f"flaky failure on try {context['try_number']}")
        return context["try_number"]


class Outcome(BaseOperator):
    def __init__(self, *, what: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.what = what

    def execute(self, context: Context) -> Any:
        if self.what == "skip":
            raise SkipTask("nothing to do today")
        if self.what == "fail":
            raise FailTask("bad input, do not retry")
        if self.what == "sleep":
            time.sleep(5)
        if self.what == "unstorable":
            return object()
        if self.what == "bad-method":
            self.defer(trigger=EchoTrigger(value=1), method_name="no_such_method")
        return self.what


class SlowAsync(BaseOperator):
    async def execute(self, context: Context) -> Any:
        await anyio.sleep(5)


class FlagSensor(BaseSensor):
    """True once ``path`` exists; its trigger is the file trigger."""

    def __init__(self, *, path: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path = path

    def poke(self, context: Context) -> Any:
        with open(self.path + ".pokes", "a") as f:
            f.write(f"{context['try_number']}\n")
        return os.path.exists(self.path)

    def trigger(self) -> BaseTrigger:
        from triggers.file import FileTrigger

        return FileTrigger(filepath=self.path, poll_interval=0.05)
