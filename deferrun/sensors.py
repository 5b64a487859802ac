"""Sensors: operators that wait for a condition, in one of three modes.

- ``poke``: check, then sleep in the worker slot, until true (holds a slot the whole time).
- ``reschedule``: check, then give the slot back with a not-before time (a slot per check).
- ``deferrable``: hand the wait to the triggerer (no slot while waiting).

The timeout counts from the start of the try, across reschedules and deferral.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any, Literal

from deferrun.exceptions import FailTask, SkipTask, TaskReschedule, TaskTimeout
from deferrun.operator import BaseOperator, Context, as_seconds
from deferrun.trigger import BaseTrigger

Mode = Literal["poke", "reschedule", "deferrable"]
MODES = ("poke", "reschedule", "deferrable")


class SensorTimeout(TaskTimeout, FailTask):
    """The sensor's own timeout passed: fails without retry, like Airflow's."""


class BaseSensor(BaseOperator):
    """Subclass with ``poke(context) -> bool`` and, for deferrable mode, ``trigger()``.

    ``poke`` may return any truthy value instead of True; it becomes the task's result.
    """

    def __init__(
        self,
        *,
        mode: Mode = "poke",
        poke_interval: timedelta | float = 60.0,
        timeout: timedelta | float = 7 * 24 * 3600.0,
        soft_fail: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        self.mode = mode
        self.poke_interval = as_seconds(poke_interval, "poke_interval") or 0.0
        self.timeout = as_seconds(timeout, "timeout") or 0.0
        self.soft_fail = soft_fail

    def poke(self, context: Context) -> Any:
        raise NotImplementedError(f"{type(self).__qualname__} must implement poke(context)")

    def trigger(self) -> BaseTrigger:
        raise NotImplementedError(
            f"{type(self).__qualname__} has no trigger(), so it cannot run with "
            "mode='deferrable'; use mode='poke' or 'reschedule'"
        )

    def _started(self, context: Context) -> float:
        started = context.get("try_started_at")
        return started.timestamp() if isinstance(started, datetime) else time.time()

    def _timed_out(self, elapsed: float) -> None:
        message = (
            f"sensor {self.task_id} timed out after {elapsed:.1f}s (timeout={self.timeout:g}s)"
        )
        if self.soft_fail:
            raise SkipTask(message)
        raise SensorTimeout(message)

    def execute(self, context: Context) -> Any:
        started = self._started(context)
        if self.mode == "deferrable":
            elapsed = time.time() - started
            if elapsed >= self.timeout:
                self._timed_out(elapsed)
            self.defer(
                trigger=self.trigger(),
                method_name="execute_complete",
                timeout=self.timeout - elapsed,
            )
        cancel = context.get("cancel_event")
        while True:
            result = self.poke(context)
            if result:
                return None if result is True else result
            elapsed = time.time() - started
            if elapsed >= self.timeout:
                self._timed_out(elapsed)
            wait = min(self.poke_interval, self.timeout - elapsed)
            if self.mode == "reschedule":
                raise TaskReschedule(time.time() + wait)
            if cancel is not None:
                cancel.wait(wait)
            else:
                time.sleep(wait)

    def execute_complete(self, context: Context, event: Any = None) -> Any:
        return event

    def on_deferral_timeout(self, context: Context, event: Any = None) -> Any:
        self._timed_out(time.time() - self._started(context))


# --------------------------------------------------------------------------- built-in sensors


class DateTimeSensor(BaseSensor):
    """Waits until ``target_time`` (tz-aware datetime or ISO string)."""

    def __init__(self, *, target_time: datetime | str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        from triggers.time import _aware

        if isinstance(target_time, str):
            target_time = datetime.fromisoformat(target_time)
        self.target_time = _aware(target_time)

    def poke(self, context: Context) -> Any:
        return self.target_time if time.time() >= self.target_time.timestamp() else False

    def trigger(self) -> BaseTrigger:
        from triggers.time import DateTimeTrigger

        return DateTimeTrigger(moment=self.target_time)


class TimeDeltaSensor(BaseSensor):
    """Waits ``delta`` from the start of the task's try (stable across reschedules)."""

    def __init__(self, *, delta: timedelta | float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.delta = timedelta(seconds=as_seconds(delta, "delta") or 0.0)

    def _target(self, context: Context) -> datetime:
        return context["try_started_at"] + self.delta

    def poke(self, context: Context) -> Any:
        target = self._target(context)
        return target if time.time() >= target.timestamp() else False

    def execute(self, context: Context) -> Any:
        self._context_target = self._target(context)
        return super().execute(context)

    def trigger(self) -> BaseTrigger:
        from triggers.time import DateTimeTrigger

        return DateTimeTrigger(moment=self._context_target)


class FileSensor(BaseSensor):
    """Waits until ``filepath`` (a path or glob) matches; the result is the matched paths."""

    def __init__(self, *, filepath: str, recursive: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.filepath = filepath
        self.recursive = recursive

    def poke(self, context: Context) -> Any:
        from triggers.file import MAX_PATHS, match_paths

        found = match_paths(self.filepath, self.recursive)
        return found[:MAX_PATHS] if found else False

    def trigger(self) -> BaseTrigger:
        from triggers.file import FileTrigger

        return FileTrigger(
            filepath=self.filepath,
            recursive=self.recursive,
            poll_interval=max(self.poke_interval, 0.05),
        )
