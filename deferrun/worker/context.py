"""The Airflow-shaped part of a task's context (``ti``, ``dag_run``, ``params``,
``logical_date``...) and XCom: what operators written for Airflow read from ``context``.

XCom values live with the task (``deferrun_xcom``). The worker loads a task's own values
(when it resumes) and its upstreams' values before the attempt, and writes what the attempt
pushed in its outcome's transaction (kept with it through an outage); ``xcom_pull`` then never
touches the database. A task's ``return_value`` is its stored result.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog

from deferrun.connections.redaction import format_error
from deferrun.core import serialization
from deferrun.core.models import ClaimedTask, TaskState
from deferrun.exceptions import SerializationError
from deferrun.store.xcom import XComWrite

XCOM_RETURN_KEY = "return_value"
DEFAULT_DAG_ID = "deferrun"
#: largest JSON of one pushed value
MAX_XCOM_BYTES = int(os.environ.get("DEFERRUN_MAX_XCOM_BYTES", "65536"))
#: most keys one task may push
MAX_XCOM_KEYS = 1000
_HOSTNAME = os.uname().nodename


class XComError(SerializationError):
    """A value cannot be pushed (too large, not storable, a bad key)."""


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class XComState:
    """One attempt's XCom: values stored before it (task id -> key -> JSON) and its pushes."""

    stored: dict[str, dict[str, str]] = field(default_factory=dict)
    pushed: dict[str, str] = field(default_factory=dict)


class AttemptState(Protocol):
    """What the context reads of an attempt (:class:`deferrun.worker.attempt.Attempt`), so this
    module does not import the one that calls it."""

    claimed: ClaimedTask
    xcom: XComState
    upstream: dict[str, Any]
    operator: Any


@dataclass
class DagRun:
    """Airflow's dag_run fields; a deferrun task is its own run, submitted at ``run_after``."""

    dag_id: str
    run_id: str
    run_after: datetime
    logical_date: datetime
    data_interval_start: datetime
    data_interval_end: datetime
    start_date: datetime
    conf: dict[str, Any] = field(default_factory=dict)
    run_type: str = "manual"
    external_trigger: bool = True

    @property
    def execution_date(self) -> datetime:
        return self.logical_date


class TaskInstance:
    """``context["ti"]``: the running try of the task and its XCom."""

    def __init__(self, attempt: AttemptState, op: Any, dag_id: str, run_id: str) -> None:
        task = attempt.claimed
        self._attempt = attempt
        self.task = op
        self.task_id: str = op.task_id
        self.dag_id = dag_id
        self.run_id = run_id
        self.try_number: int = task.try_number
        #: Airflow's max_tries is the number of retries (deferrun's max_tries counts the first)
        self.max_tries: int = task.max_tries - 1
        self.map_index = -1
        self.queue: str = task.queue
        self.pool = getattr(op, "pool", None)
        self.state = "running"
        self.hostname = _HOSTNAME
        self.deferrun_task_id: str = task.id

    def xcom_push(self, key: str, value: Any, *_: Any, **__: Any) -> None:
        """Store ``value`` (plain data, up to DEFERRUN_MAX_XCOM_BYTES as JSON) under ``key``."""
        if not isinstance(key, str) or not key or "\x00" in key or len(key) > 512:
            raise XComError(f"xcom_push key must be a non-empty string (<= 512 chars), got {key!r}")
        if not _utf8(key):
            raise XComError(
                f"xcom_push key {key!r} is not valid UTF-8 text (a lone surrogate, as bytes "
                "decoded with surrogateescape give); decode the bytes with errors='replace'"
            )
        if key == XCOM_RETURN_KEY:
            raise XComError(
                "xcom_push(key='return_value') is reserved: return the value from the method "
                "instead (it is stored as the task's result)"
            )
        try:
            text = serialization.dumps(value, f"xcom_push({key!r}) value")
        except UnicodeEncodeError:
            raise XComError(
                f"xcom_push({key!r}): the value holds text that is not valid UTF-8 (a lone "
                "surrogate); decode its bytes with errors='replace' or push the bytes"
            ) from None
        size = len(text.encode())
        if size > MAX_XCOM_BYTES:
            raise XComError(
                f"xcom_push({key!r}): the value is {size:,} bytes as JSON, over the limit of "
                f"{MAX_XCOM_BYTES:,} (DEFERRUN_MAX_XCOM_BYTES); store large data elsewhere and "
                "push a reference"
            )
        pushed = self._attempt.xcom.pushed
        if key not in pushed and len(pushed) >= MAX_XCOM_KEYS:
            raise XComError(f"xcom_push({key!r}): a task may push at most {MAX_XCOM_KEYS} keys")
        pushed[key] = text

    def xcom_pull(
        self,
        task_ids: str | Iterable[str] | None = None,
        dag_id: str | None = None,
        key: str | None = XCOM_RETURN_KEY,
        include_prior_dates: bool = False,
        *,
        map_indexes: Any = None,
        default: Any = None,
        run_id: str | None = None,
    ) -> Any:
        """A value of this task or of an upstream task (by task_id name or deferrun id);
        ``default`` when there is none. A list of task_ids gives a list of values."""
        if task_ids is None or isinstance(task_ids, str):
            return self._pull(task_ids or self.task_id, key or XCOM_RETURN_KEY, default)
        return [self._pull(t, key or XCOM_RETURN_KEY, default) for t in task_ids]

    def _pull(self, ref: str, key: str, default: Any) -> Any:
        attempt = self._attempt
        if ref in (self.task_id, self.deferrun_task_id):
            owner = self.deferrun_task_id
            if key in attempt.xcom.pushed:
                return serialization.loads(attempt.xcom.pushed[key])
        else:
            upstream = attempt.upstream.get(ref)
            if upstream is None:
                return default
            owner = upstream["task_id"]
            if key == XCOM_RETURN_KEY:
                result = upstream.get("result")
                return default if result is None else result
        text = attempt.xcom.stored.get(owner, {}).get(key)
        return default if text is None else serialization.loads(text)

    def get_dagrun(self) -> DagRun:
        return self._dag_run

    def __repr__(self) -> str:
        return f"<TaskInstance {self.dag_id}.{self.task_id} try {self.try_number}>"


def airflow_context(attempt: AttemptState, op: Any) -> dict[str, Any]:
    """The keys Airflow operators read from ``context``."""
    task = attempt.claimed
    dag_id = getattr(op, "dag_id", None) or DEFAULT_DAG_ID
    run_id = task.id
    logical = datetime.fromtimestamp(task.created_at, UTC)
    dag_run = DagRun(
        dag_id=dag_id,
        run_id=run_id,
        run_after=logical,
        logical_date=logical,
        data_interval_start=logical,
        data_interval_end=logical,
        start_date=datetime.fromtimestamp(task.try_started_at, UTC),
    )
    ti = TaskInstance(attempt, op, dag_id, run_id)
    ti._dag_run = dag_run
    params = getattr(op, "params", None)
    ts = logical.isoformat()
    ds = ts[:10]
    ds_nodash = ds.replace("-", "")
    return {
        "ti": ti,
        "task_instance": ti,
        "task": op,
        "dag": getattr(op, "dag", None),
        "dag_run": dag_run,
        "run_id": run_id,
        "params": params if isinstance(params, dict) else {},
        "logical_date": logical,
        "execution_date": logical,
        "data_interval_start": logical,
        "data_interval_end": logical,
        "ds": ds,
        "ds_nodash": ds_nodash,
        "ts": ts,
        "ts_nodash": ds_nodash + "T" + ts[11:19].replace(":", ""),
        "task_instance_key_str": f"{dag_id}__{op.task_id}__{ds_nodash}",
        "map_index_template": None,
        "expanded_ti_count": None,
    }


def start_call(op: Any, event: Any) -> tuple[Any, dict[str, Any]]:
    """What runs when a task started from a trigger is resumed: ``execute`` (the event in
    ``context["trigger_event"]``), or an Airflow ``start_trigger_args.next_method``."""
    args = getattr(op, "start_trigger_args", None)
    next_method = getattr(args, "next_method", None)
    if isinstance(next_method, str) and next_method:
        return getattr(op, next_method), {
            **(getattr(args, "next_kwargs", None) or {}),
            "event": event,
        }
    return op.execute, {}


def is_fresh(next_method: str | None) -> bool:
    from deferrun.core.baseoperator import BaseOperator

    return next_method is None or next_method == BaseOperator.START_METHOD


async def load_xcoms(store: Any, attempt: AttemptState) -> None:
    """Read the values the attempt may pull, when there can be any: its own when it resumes
    a deferral, its upstreams' when it has upstreams."""
    task = attempt.claimed
    resumed = not is_fresh(task.next_method)
    if task.trigger_rule is None and not (resumed and task.has_xcoms):
        return  # nothing it could pull: no read (the claim said whether it has any)
    stored = await store.load_xcoms(task.id)
    if not resumed:
        stored.pop(task.id, None)  # an earlier try's values: a fresh try starts without them
    attempt.xcom.stored = stored


def xcom_write(attempt: AttemptState) -> XComWrite | None:
    """What the attempt pushed, to be written with its outcome (a fresh retry also drops the
    earlier try's values); None when there is nothing to write."""
    task = attempt.claimed
    clear = is_fresh(task.next_method) and task.try_number > 1
    if attempt.xcom.pushed or clear:
        return XComWrite(dict(attempt.xcom.pushed), clear)
    return None


async def kill_if_cancelled(store: Any, attempt: AttemptState) -> None:
    """Airflow's ``on_kill``: called (on a thread of its own) when a user cancelled the running
    task; never on timeouts, reassignment or shutdown."""
    on_kill = getattr(attempt.operator, "on_kill", None)
    if not callable(on_kill):
        return
    info = await store.get_task(attempt.claimed.id)
    if info is None or info.state != TaskState.CANCELLED:
        return

    def call() -> None:
        try:
            on_kill()
        except BaseException as exc:  # operator code: report it, never let it escape
            structlog.get_logger("deferrun.worker").warning(
                "on_kill raised", task_id=attempt.claimed.id, error=format_error(exc)
            )

    threading.Thread(
        target=call, name=f"deferrun-on-kill-{attempt.claimed.id}", daemon=True
    ).start()
