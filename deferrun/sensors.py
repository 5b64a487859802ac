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

from deferrun.core.baseoperator import BaseOperator, Context, as_seconds
from deferrun.core.basetrigger import BaseTrigger
from deferrun.exceptions import FailTask, SkipTask, TaskReschedule, TaskTimeout

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
                raise TaskReschedule(wait)
            if cancel is not None:
                cancel.wait(wait)
            else:
                time.sleep(wait)

    def execute_complete(self, context: Context, event: Any = None) -> Any:
        return event

    def on_deferral_timeout(self, context: Context, event: Any = None) -> Any:
        self._timed_out(time.time() - self._started(context))


# --------------------------------------------------------------------------- built-in sensors


def check_poke_interval(sensor: BaseSensor) -> None:
    """Built-in sensors refuse a zero, tiny, NaN or infinite poke_interval (a busy loop or
    no poke at all); the same rule as the triggers' poll_interval."""
    from deferrun.core.basetrigger import check_interval

    check_interval(sensor.poke_interval, "poke_interval")


class DateTimeSensor(BaseSensor):
    """Waits until ``target_time`` (tz-aware datetime or ISO string)."""

    def __init__(self, *, target_time: datetime | str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_poke_interval(self)
        from triggers.time import checked_aware

        if isinstance(target_time, str):
            target_time = datetime.fromisoformat(target_time)
        self.target_time = checked_aware(target_time)

    def poke(self, context: Context) -> Any:
        return self.target_time if time.time() >= self.target_time.timestamp() else False

    def trigger(self) -> BaseTrigger:
        from triggers.time import DateTimeTrigger

        return DateTimeTrigger(moment=self.target_time)


class TimeDeltaSensor(BaseSensor):
    """Waits ``delta`` from the start of the task's try (stable across reschedules)."""

    def __init__(self, *, delta: timedelta | float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_poke_interval(self)
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
        check_poke_interval(self)
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


class TriggerSensor(BaseSensor):
    """A sensor whose check is its trigger's ``poll()``, so every mode agrees.

    poke / reschedule run ``poll()`` once per poke on a private event loop for the length of
    the execute call (one shared client across pokes); deferrable hands the trigger over.
    """

    _portal: Any = None

    def execute(self, context: Context) -> Any:
        if self.mode == "deferrable":
            return super().execute(context)
        from anyio.from_thread import start_blocking_portal

        from deferrun.connections.cache import close_loop_clients

        with start_blocking_portal() as portal:
            self._portal = portal
            try:
                return super().execute(context)
            finally:
                portal.call(close_loop_clients)
                self._portal = None

    def poke(self, context: Context) -> Any:
        from deferrun.core.basetrigger import PollingTrigger
        from deferrun.exceptions import TransientError

        trigger = self.trigger()
        assert isinstance(trigger, PollingTrigger)
        try:
            event = self._portal.call(trigger.poll)
        except TransientError as exc:
            self.log.warning("poke failed; will poke again", error=str(exc))
            return False
        if event is None:
            return False
        return self.on_event(event.payload) or True

    def on_event(self, payload: Any) -> Any:
        """Turn the trigger's event into the task's result (or raise)."""
        return payload

    def execute_complete(self, context: Context, event: Any = None) -> Any:
        return self.on_event(event)


class S3KeySensor(TriggerSensor):
    """Waits for S3 keys; see :class:`triggers.s3.S3KeyTrigger`."""

    def __init__(
        self,
        *,
        bucket_key: str | list[str],
        bucket_name: str | None = None,
        wildcard_match: bool = False,
        aws_conn_id: str = "aws_default",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_poke_interval(self)
        self.bucket_key = bucket_key
        self.bucket_name = bucket_name
        self.wildcard_match = wildcard_match
        self.aws_conn_id = aws_conn_id

    def trigger(self) -> BaseTrigger:
        from triggers.s3 import S3KeyTrigger

        return S3KeyTrigger(
            bucket_name=self.bucket_name,
            bucket_key=self.bucket_key,
            wildcard_match=self.wildcard_match,
            aws_conn_id=self.aws_conn_id,
            poll_interval=self.poke_interval,
        )


class HttpSensor(TriggerSensor):
    """Waits for an HTTP endpoint; see :class:`triggers.http.HttpTrigger`."""

    def __init__(
        self,
        *,
        endpoint: str,
        http_conn_id: str = "http_default",
        method: str = "GET",
        headers: dict[str, str] | None = None,
        data: Any = None,
        response_check: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_poke_interval(self)
        from deferrun.connections.clients import check_endpoint

        self.endpoint = check_endpoint(endpoint)
        self.http_conn_id = http_conn_id
        self.method = method
        self.headers = headers
        self.data = data
        self.response_check = response_check

    def trigger(self) -> BaseTrigger:
        from triggers.http import HttpTrigger

        return HttpTrigger(
            endpoint=self.endpoint,
            http_conn_id=self.http_conn_id,
            method=self.method,
            headers=self.headers,
            data=self.data,
            poll_interval=self.poke_interval,
            response_check=self.response_check,
        )


class SqlSensor(TriggerSensor):
    """Waits until a query's first cell is truthy; see :class:`triggers.sql.SqlTrigger`."""

    def __init__(
        self,
        *,
        sql: str,
        conn_id: str = "postgres_default",
        parameters: list[Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_poke_interval(self)
        self.sql = sql
        self.conn_id = conn_id
        self.parameters = parameters

    def trigger(self) -> BaseTrigger:
        from triggers.sql import SqlTrigger

        return SqlTrigger(
            sql=self.sql,
            conn_id=self.conn_id,
            parameters=self.parameters,
            poll_interval=self.poke_interval,
        )


class JobRunFailed(Exception):
    """The external job run ended in a failure state."""


def job_result(payload: Any, what: str, error_field: str | None) -> Any:
    """A job event's body on success; JobRunFailed with the run's state and error otherwise."""
    if isinstance(payload, dict) and payload.get("status") == "failed":
        from deferrun.connections.clients import dotted

        error = ""
        if error_field:
            try:
                error = f": {dotted(payload.get('body'), error_field)}"
            except (KeyError, IndexError, TypeError):
                error = ""
        raise JobRunFailed(f"{what} ended in state {payload.get('state')!r}{error}")
    return payload.get("body") if isinstance(payload, dict) else payload


class JobRunSensor(TriggerSensor):
    """Waits for an existing external job run to end; fails the task if the run failed."""

    def __init__(
        self,
        *,
        status_endpoint: str,
        http_conn_id: str,
        status_field: str = "status",
        success_states: list[str] | None = None,
        failure_states: list[str] | None = None,
        error_field: str | None = "error",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_poke_interval(self)
        from deferrun.connections.clients import check_endpoint

        self.status_endpoint = check_endpoint(status_endpoint, "status_endpoint")
        self.http_conn_id = http_conn_id
        self.status_field = status_field
        self.success_states = success_states
        self.failure_states = failure_states
        self.error_field = error_field

    def trigger(self) -> BaseTrigger:
        from triggers.job import DEFAULT_FAILURE_STATES, DEFAULT_SUCCESS_STATES, JobStatusTrigger

        return JobStatusTrigger(
            status_endpoint=self.status_endpoint,
            http_conn_id=self.http_conn_id,
            status_field=self.status_field,
            success_states=self.success_states or DEFAULT_SUCCESS_STATES,
            failure_states=self.failure_states or DEFAULT_FAILURE_STATES,
            poll_interval=self.poke_interval,
        )

    def on_event(self, payload: Any) -> Any:
        return job_result(payload, f"job run {self.status_endpoint}", self.error_field)


class TaskSensor(BaseSensor):
    """Waits until another task (``external_task_id``) ends in one of ``allowed_states``.

    Fails when it ends in one of ``failed_states`` (or in any other end state), like
    Airflow's ExternalTaskSensor. Deferrable mode holds no slot and polls nothing: the store
    wakes it in the transaction that ends the watched task.
    """

    def __init__(
        self,
        *,
        external_task_id: str,
        allowed_states: list[str] | None = None,
        failed_states: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        from triggers.task import DEFAULT_FAILED_STATES, check_states

        super().__init__(**kwargs)
        self.external_task_id = external_task_id
        self.allowed_states = check_states(allowed_states or ["success"], "allowed_states")
        self.failed_states = check_states(
            failed_states or list(DEFAULT_FAILED_STATES), "failed_states"
        )

    def poke(self, context: Context) -> Any:
        from deferrun.client import Client

        with Client(context.get("db")) as client:
            info = client.get(self.external_task_id)
        if not info.finished:
            return False
        return self._judge(str(info.state), info.result)

    def trigger(self) -> BaseTrigger:
        from triggers.task import TaskStateTrigger

        return TaskStateTrigger(self.external_task_id, self.allowed_states, self.failed_states)

    def execute_complete(self, context: Context, event: Any = None) -> Any:
        event = event or {}
        return self._judge(str(event.get("state")), event.get("result"))

    def _judge(self, state: str, result: Any) -> Any:
        if state in self.allowed_states:
            return {"task_id": self.external_task_id, "state": state, "result": result}
        message = (
            f"task {self.external_task_id} ended {state}, not in allowed_states "
            f"{self.allowed_states}"
        )
        if self.soft_fail:
            raise SkipTask(message)
        raise FailTask(message)


__all__ = [
    "BaseSensor",
    "DateTimeSensor",
    "FileSensor",
    "HttpSensor",
    "JobRunFailed",
    "JobRunSensor",
    "S3KeySensor",
    "SensorTimeout",
    "SqlSensor",
    "TaskSensor",
    "TimeDeltaSensor",
    "TriggerSensor",
]
