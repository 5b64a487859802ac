"""Airflow-style user code, written the way provider code is, with only its imports rewritten
to ``deferrun.compat.airflow``: a dbt Cloud-shaped hook of the user's own, a trigger whose
``serialize()`` returns the upstream classpath, a deferrable run-job operator that pushes XCom,
a downstream operator that pulls it, and sensors."""

from __future__ import annotations

import asyncio
import enum
import json
import time
import urllib.request
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp

from deferrun.compat.airflow import (
    AirflowException,
    AirflowFailException,
    AirflowSkipException,
    BaseHook,
    BaseOperator,
    BaseSensorOperator,
    BaseTrigger,
    Context,
    PokeReturnValue,
    StartTriggerArgs,
    TaskDeferralError,
    TaskSuccessEvent,
    TriggerEvent,
    conf,
    timezone,
)


class JobStatus(enum.IntEnum):
    """dbt Cloud's run status numbers."""

    QUEUED = 1
    STARTING = 2
    RUNNING = 3
    SUCCESS = 10
    ERROR = 20
    CANCELLED = 30


class Priority(enum.StrEnum):
    LOW = "low"
    HIGH = "high"


# --------------------------------------------------------------------------- the user's hook


class DbtCloudLikeHook(BaseHook):
    """The user's own hook: login is the account id, password the API token."""

    conn_name_attr = "dbt_cloud_conn_id"
    default_conn_name = "dbt_cloud_default"

    def __init__(self, dbt_cloud_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.dbt_cloud_conn_id = dbt_cloud_conn_id

    def _base(self) -> tuple[str, dict[str, str]]:
        conn = self.get_connection(self.dbt_cloud_conn_id)
        port = f":{conn.port}" if conn.port else ""
        scheme = conn.extra_dejson.get("proxy_scheme", "http")
        base = f"{scheme}://{conn.host}{port}/{conn.schema}/v2/accounts/{conn.login}/"
        return base, {"Authorization": f"Token {conn.password}"}

    def trigger_job_run(self, job_id: int, cause: str) -> dict[str, Any]:
        base, headers = self._base()
        request = urllib.request.Request(
            f"{base}jobs/{job_id}/run/",
            data=json.dumps({"cause": cause}).encode(),
            headers={**headers, "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())["data"]

    async def get_job_status(self, run_id: int) -> int:
        base, headers = self._base()
        async with (
            aiohttp.ClientSession(headers=headers) as session,
            session.get(f"{base}runs/{run_id}/") as response,
        ):
            response.raise_for_status()
            return int((await response.json())["data"]["status"])


# --------------------------------------------------------------------------- the trigger


class DbtCloudRunJobTrigger(BaseTrigger):
    """Polls a run until it ends or ``end_time`` passes (provider style)."""

    def __init__(
        self,
        conn_id: str,
        run_id: int,
        end_time: float,
        poll_interval: float,
        account_id: int | None,
        priority: Priority = Priority.LOW,
        status_names: dict[int, str] | None = None,
    ) -> None:
        super().__init__()
        self.conn_id = conn_id
        self.run_id = run_id
        self.end_time = end_time
        self.poll_interval = poll_interval
        self.account_id = account_id
        self.priority = priority
        self.status_names = status_names or {s.value: s.name for s in JobStatus}

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "airflow.providers.dbt.cloud.triggers.dbt.DbtCloudRunJobTrigger",
            {
                "run_id": self.run_id,
                "account_id": self.account_id,
                "conn_id": self.conn_id,
                "end_time": self.end_time,
                "poll_interval": self.poll_interval,
                "priority": self.priority,
                "status_names": self.status_names,
            },
        )

    async def run(self):  # type: ignore[no-untyped-def]
        hook = DbtCloudLikeHook(self.conn_id)
        try:
            while True:
                status = JobStatus(await hook.get_job_status(self.run_id))
                if status in (JobStatus.SUCCESS, JobStatus.ERROR, JobStatus.CANCELLED):
                    name = self.status_names[status.value].lower()
                    yield TriggerEvent(
                        {
                            "status": "success" if status is JobStatus.SUCCESS else name,
                            "message": f"Job run {self.run_id} has {name}.",
                            "run_id": self.run_id,
                            "priority": self.priority,
                        }
                    )
                    return
                if self.end_time < time.time():
                    yield TriggerEvent(
                        {
                            "status": "error",
                            "message": f"Job run {self.run_id} did not finish in time",
                            "run_id": self.run_id,
                        }
                    )
                    return
                await asyncio.sleep(self.poll_interval)
        except Exception as exc:
            yield TriggerEvent({"status": "error", "message": str(exc), "run_id": self.run_id})


# --------------------------------------------------------------------------- the operators


class DbtCloudRunJobOperator(BaseOperator):
    template_fields = ("job_id", "account_id")

    def __init__(
        self,
        *,
        dbt_cloud_conn_id: str = DbtCloudLikeHook.default_conn_name,
        job_id: int,
        account_id: int | None = None,
        timeout: int = 60,
        check_interval: float = 0.2,
        marker: str | None = None,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.dbt_cloud_conn_id = dbt_cloud_conn_id
        self.job_id = job_id
        self.account_id = account_id
        self.timeout = timeout
        self.check_interval = check_interval
        self.marker = marker
        self.deferrable = deferrable

    def execute(self, context: Context) -> Any:
        ti = context["ti"]
        cause = (
            f"Triggered via deferrun by task {self.task_id!r} in the {self.dag.dag_id} DAG "
            f"(try {ti.try_number}, logical date {context['ds']})"
        )
        run = DbtCloudLikeHook(self.dbt_cloud_conn_id).trigger_job_run(self.job_id, cause)
        if self.marker:  # counts the job runs this operator started
            with open(self.marker, "a") as out:
                out.write(f"{run['id']}\n")
        ti.xcom_push(key="job_run_url", value=f"https://cloud.example/#/runs/{run['id']}")
        ti.xcom_push(key="job_run_started_at", value=timezone.utcnow())
        if not self.deferrable:
            raise AirflowException("this test operator only runs deferrable")
        end_time = time.time() + self.timeout
        self.defer(
            timeout=timedelta(seconds=self.timeout),
            trigger=DbtCloudRunJobTrigger(
                conn_id=self.dbt_cloud_conn_id,
                run_id=run["id"],
                end_time=end_time,
                poll_interval=self.check_interval,
                account_id=self.account_id,
                priority=Priority.HIGH,
            ),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> int:
        ti = context["ti"]
        if event["status"] == "cancelled":
            raise AirflowFailException(f"Job run {event['run_id']} has been cancelled.")
        if event["status"] == "error":
            raise AirflowException(event["message"])
        ti.xcom_push(key="priority", value=event["priority"])
        started = ti.xcom_pull(task_ids=self.task_id, key="job_run_started_at")
        ti.xcom_push(key="seen_start", value=started.isoformat())
        return event["run_id"]


class ReportRun(BaseOperator):
    """Downstream: reads the upstream's XCom and the Airflow context keys."""

    def __init__(self, *, upstream_task: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.upstream_task = upstream_task

    def execute(self, context: Context) -> dict[str, Any]:
        ti = context["task_instance"]
        run = context["dag_run"]
        return {
            "run_id": ti.xcom_pull(task_ids=self.upstream_task),
            "url": ti.xcom_pull(task_ids=self.upstream_task, key="job_run_url"),
            "priority": ti.xcom_pull(task_ids=self.upstream_task, key="priority"),
            "seen_start": ti.xcom_pull(task_ids=[self.upstream_task], key="seen_start"),
            "missing": ti.xcom_pull(task_ids="nope", key="x", default="fallback"),
            "ds": context["ds"],
            "logical_date": context["logical_date"].isoformat(),
            "run_after_is_logical": run.run_after == run.logical_date,
            "data_interval_end": run.data_interval_end.isoformat(),
            "dag_id": self.dag_id,
            "params": context["params"],
            "owner": self.owner,
            "pool": self.pool,
            "try_number": ti.try_number,
        }


class NotStorable:
    """A value no trigger kwargs may hold."""


class LeakyTrigger(BaseTrigger):
    def __init__(self, handle: Any) -> None:
        super().__init__()
        self.handle = handle

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("airflow.providers.example.triggers.LeakyTrigger", {"handle": self.handle})

    async def run(self):  # type: ignore[no-untyped-def]
        yield TriggerEvent(None)


class DeferBadTrigger(BaseOperator):
    """Starts something, then defers on a trigger that cannot be stored: the error must come
    from ``defer()`` itself, so the operator can undo what it started."""

    def __init__(self, *, marker: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.marker = marker

    def execute(self, context: Context) -> None:
        Path(self.marker).write_text("started\n")
        try:
            self.defer(trigger=LeakyTrigger(handle=NotStorable()), method_name="execute_complete")
        except TaskDeferralError as exc:
            with open(self.marker, "a") as out:
                out.write(f"undone: {type(exc).__name__}\n")
            raise


class FlagSensor(BaseSensorOperator):
    """Done when a file exists; its text is the sensor's value (PokeReturnValue)."""

    def __init__(self, *, path: str, fail_with: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path = path
        self.fail_with = fail_with

    def poke(self, context: Context) -> bool | PokeReturnValue:
        if self.fail_with == "skip":
            raise AirflowSkipException("nothing to do today")
        if self.fail_with == "fail":
            raise AirflowFailException("bad input, do not retry")
        if self.fail_with == "boom":
            raise RuntimeError("flaky check")
        path = Path(self.path)
        return PokeReturnValue(path.exists(), path.read_text() if path.exists() else None)


class WaitThenRun(BaseOperator):
    """Airflow's start_from_trigger: no slot until the trigger fires, then ``next_method``."""

    start_from_trigger = True
    start_trigger_args = StartTriggerArgs(
        trigger_cls="triggers.time.TimeDeltaTrigger",
        trigger_kwargs={"delta": 0.2},
        next_method="after_wait",
        next_kwargs={"tag": "from-start-args"},
    )

    def execute(self, context: Context) -> str:
        raise AirflowFailException("execute must not run for a task started from a trigger")

    def after_wait(self, context: Context, event: Any, tag: str) -> dict[str, Any]:
        return {"tag": tag, "fired": event is not None, "try": context["ti"].try_number}


class EndsItself(BaseTrigger):
    """Ends its task from the triggerer (Airflow 3's end_from_trigger)."""

    def __init__(self, rows: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rows = rows

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("airflow.providers.example.triggers.EndsItself", {"rows": self.rows})

    async def run(self):  # type: ignore[no-untyped-def]
        yield TaskSuccessEvent(xcoms={"return_value": {"rows": self.rows}})


class DeferToEnd(BaseOperator):
    def execute(self, context: Context) -> None:
        self.defer(trigger=EndsItself(rows=3), method_name="execute_complete")

    def execute_complete(self, context: Context, event: Any = None) -> None:
        raise AirflowFailException("no worker resumes a task its trigger ended")


class KillMe(BaseOperator):
    """Runs until stopped; ``on_kill`` cancels its (pretend) external job."""

    def __init__(self, *, marker: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.marker = marker

    def execute(self, context: Context) -> None:
        with open(self.marker, "a") as out:
            out.write("started\n")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.05)

    def on_kill(self) -> None:
        with open(self.marker, "a") as out:
            out.write("killed\n")


class PushThenFail(BaseOperator):
    """Try 1 pushes and fails; try 2 defers, and on resuming must not see try 1's value (a
    fresh try starts without the earlier try's values)."""

    def execute(self, context: Context) -> Any:
        ti = context["ti"]
        if ti.try_number == 1:
            ti.xcom_push(key="attempt_note", value="from try 1")
            raise AirflowException("first try fails")
        from triggers.time import TimeDeltaTrigger

        self.defer(trigger=TimeDeltaTrigger(delta=0.05), method_name="execute_complete")

    def execute_complete(self, context: Context, event: Any = None) -> Any:
        ti = context["ti"]
        return {"try": ti.try_number, "seen": ti.xcom_pull(key="attempt_note", default="none")}


class PushWhenFlagged(BaseOperator):
    """Counts each run of execute in ``marker``, waits for ``flag``, pushes an XCom, then
    ends the way ``how`` says (return / defer / fail): the outcome and the push meet the
    database together."""

    def __init__(self, *, marker: str, flag: str, how: str = "return", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.marker, self.flag, self.how = marker, flag, how

    def execute(self, context: Context) -> Any:
        with open(self.marker, "a") as f:
            f.write("run\n")
        deadline = time.monotonic() + 60
        while not Path(self.flag).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        context["ti"].xcom_push(key="pushed", value=self.how)
        if self.how == "defer":
            from triggers.time import TimeDeltaTrigger

            self.defer(trigger=TimeDeltaTrigger(delta=0.05), method_name="execute_complete")
        if self.how == "fail":
            raise AirflowFailException("fails after pushing")
        return "done"

    def execute_complete(self, context: Context, event: Any = None) -> Any:
        return context["ti"].xcom_pull(key="pushed", default="missing")


class LeakConnection(BaseOperator):
    """Does everything careless code does with a connection: logs it, fails quoting it."""

    def __init__(self, *, conn_id: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conn_id = conn_id

    def execute(self, context: Context) -> Any:
        conn = BaseHook.get_connection(self.conn_id)
        self.log.info("connection", password=conn.password, extra=conn.extra_dejson)
        self.log.info(f"inline {conn.password} {conn.extra}")
        raise AirflowFailException(f"failed with {conn.password} {conn.extra}")


class SurrogateTrigger(BaseTrigger):
    """Raises with a lone surrogate in its message (text decoded with surrogateescape)."""

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("airflow.providers.example.triggers.SurrogateTrigger", {})

    async def run(self) -> Any:
        raise AirflowException("boom \udcff from the trigger")
        yield  # pragma: no cover


class SurrogateText(BaseOperator):
    """Logs a lone surrogate (``how='log'``) or defers on a trigger that raises one."""

    def __init__(self, *, how: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.how = how

    def execute(self, context: Context) -> Any:
        if self.how == "defer":
            self.defer(trigger=SurrogateTrigger(), method_name="execute_complete")
        self.log.info("log \udcff line", value="v\udcfe")
        return {"try": context["ti"].try_number}

    def execute_complete(self, context: Context, event: Any = None) -> Any:
        return event
