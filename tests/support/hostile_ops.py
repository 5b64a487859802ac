"""Badly behaved operators (and a few good ones) for tests/worker/test_hostile_operators.py.

Importable by the in-process tests and, through PYTHONPATH, by real worker processes.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import anyio

from deferrun import BaseOperator, Context, SkipTask
from tests.support.userland import EchoTrigger


class StrSub(str):
    pass


class FloatSub(float):  # what numpy.float64 looks like to a serializer
    pass


class IntSub(int):
    pass


def append(path: str, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")


class Returns(BaseOperator):
    """Ends in a way picked by ``what``: odd return values, odd error texts, or fine."""

    def __init__(self, *, what: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.what = what

    def execute(self, context: Context) -> Any:
        match self.what:
            case "str-subclass":
                return StrSub("x")
            case "float-subclass":
                return FloatSub(1.5)
            case "int-subclass":
                return {"n": [IntSub(3)]}
            case "surrogate":
                return "a\ud800b"
            case "nul":
                return "a\x00b"
            case "nul-error":
                raise ValueError("bad\x00byte")
            case "surrogate-error":
                raise ValueError("bad\udc80byte")
            case "nul-skip":
                raise SkipTask("skip\x00reason")
            case "thread":
                return threading.current_thread().name
        return "ok"


class Stubborn(BaseOperator):
    """A retry loop that swallows every Exception; marks each step and its end in ``marker``."""

    def __init__(self, *, marker: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.marker = marker

    def execute(self, context: Context) -> Any:
        append(self.marker, "start")
        try:
            while True:
                try:
                    time.sleep(0.02)
                except Exception:
                    append(self.marker, "swallowed")
        finally:
            append(self.marker, "stopped")


class AsyncStubborn(Stubborn):
    async def execute(self, context: Context) -> Any:  # type: ignore[override]
        append(self.marker, "start")
        try:
            while True:
                try:
                    await anyio.sleep(0.02)
                except Exception:
                    append(self.marker, "swallowed")
        finally:
            append(self.marker, "stopped")


class OwnTimeout(BaseOperator):
    """Raises a TimeoutError of its own (an upstream call timed out), no execution_timeout."""

    def execute(self, context: Context) -> Any:
        raise TimeoutError("the upstream API timed out")


class AsyncOwnTimeout(BaseOperator):
    async def execute(self, context: Context) -> Any:
        await anyio.sleep(0)
        raise TimeoutError("the upstream API timed out")


EXITS: dict[str, Any] = {
    "SystemExit": lambda: SystemExit(3),
    "KeyboardInterrupt": KeyboardInterrupt,
    "GeneratorExit": GeneratorExit,
    "CancelledError": asyncio.CancelledError,
}


class Exits(BaseOperator):
    """Raises a process-stopping exception from execute or from its resume method."""

    def __init__(self, *, exc: str, where: str = "execute", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.exc = exc
        self.where = where

    def execute(self, context: Context) -> Any:
        if self.where == "resume":
            self.defer(trigger=EchoTrigger(value=1), method_name="resume")
        raise EXITS[self.exc]()

    def resume(self, context: Context, event: Any = None) -> Any:
        raise EXITS[self.exc]()


class AsyncExits(Exits):
    async def execute(self, context: Context) -> Any:  # type: ignore[override]
        await anyio.sleep(0)
        if self.where == "resume":
            self.defer(trigger=EchoTrigger(value=1), method_name="resume")
        raise EXITS[self.exc]()

    async def resume(self, context: Context, event: Any = None) -> Any:  # type: ignore[override]
        await anyio.sleep(0)
        raise EXITS[self.exc]()


class Steps(BaseOperator):
    """Runs ``steps`` sleeps of ``step`` s (interruptible between them), logging its interval.

    Lines in ``log``: ``start|stop TASK TRY PID EPOCH``; returns its try number and pid.
    """

    def __init__(self, *, log: str, steps: int = 40, step: float = 0.05, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.log_path = log
        self.steps = steps
        self.step = step

    def execute(self, context: Context) -> Any:
        tag = f"{context['task_id']} {context['try_number']} {os.getpid()}"
        append(self.log_path, f"start {tag} {time.time()}")
        try:
            for _ in range(self.steps):
                time.sleep(self.step)
        finally:
            append(self.log_path, f"stop {tag} {time.time()}")
        return {"try": context["try_number"], "pid": os.getpid()}


class WaitFile(BaseOperator):
    """Returns ``"done"`` once ``path`` exists (checked for at most 120 s)."""

    def __init__(self, *, path: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path = path

    def execute(self, context: Context) -> Any:
        for _ in range(2400):
            if os.path.exists(self.path):
                return "done"
            time.sleep(0.05)
        raise RuntimeError(f"{self.path} never appeared")


class AsyncBackgroundExit(BaseOperator):
    """Starts a task of its own that raises SystemExit (nothing awaits it), then succeeds."""

    async def execute(self, context: Context) -> Any:
        async def boom() -> None:
            raise SystemExit(9)

        self._task = asyncio.ensure_future(boom())
        await asyncio.sleep(0.3)
        return "done despite a background SystemExit"


class Big(BaseOperator):
    """Returns a string of ``size`` characters."""

    def __init__(self, *, size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.size = size

    def execute(self, context: Context) -> Any:
        return "x" * self.size


_thread_state = threading.local()


class ThreadLocalPeek(BaseOperator):
    """Returns the thread-local value a previous task left behind (None if none), then sets
    its own, and renames its thread."""

    def execute(self, context: Context) -> Any:
        seen = getattr(_thread_state, "owner", None)
        _thread_state.owner = context["task_id"]
        name = threading.current_thread().name
        threading.current_thread().name = "renamed-by-" + context["task_id"]
        return {"seen": seen, "name": name}
