"""Ready-made operators. ``RunJobOperator``: start an external job run, wait for it deferred."""

from __future__ import annotations

from typing import Any

from deferrun.connections.clients import dotted
from deferrun.core.baseoperator import BaseOperator, Context
from deferrun.exceptions import FailTask
from deferrun.sensors import JobRunFailed, job_result

__all__ = ["DbtCloudRunJobOperator", "JobRunFailed", "RunJobOperator"]

SUBMIT_ATTEMPTS = 5  # 429s (or unsent requests) on a dbt run submission, honouring Retry-After


class RunJobOperator(BaseOperator):
    """POST to ``submit_endpoint`` to start a run, then defer until the run ends.

    The run id is read from the response at ``run_id_field`` (dotted path) and substituted into
    ``status_endpoint`` (``"runs/{run_id}"``). The task's result is the final status body; a
    failed run raises JobRunFailed with its state and error (retries re-submit the job).
    Bad credentials fail at once without retrying. ``headers`` go with the submit and every
    status poll; the connection's auth scheme (``?auth=token|bearer|basic``) applies to both.
    """

    def __init__(
        self,
        *,
        http_conn_id: str,
        submit_endpoint: str,
        status_endpoint: str,
        submit_method: str = "POST",
        submit_json: Any = None,
        run_id_field: str = "id",
        status_field: str = "status",
        success_states: list[str] | None = None,
        failure_states: list[str] | None = None,
        error_field: str | None = "error",
        poll_interval: float = 10.0,
        deferral_timeout: float | None = None,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if "{run_id}" not in status_endpoint:
            raise ValueError("status_endpoint must contain {run_id}, e.g. 'api/runs/{run_id}'")
        self.http_conn_id = http_conn_id
        self.submit_endpoint = submit_endpoint
        self.status_endpoint = status_endpoint
        self.submit_method = submit_method
        self.submit_json = submit_json
        self.run_id_field = run_id_field
        self.status_field = status_field
        self.success_states = success_states
        self.failure_states = failure_states
        self.error_field = error_field
        self.poll_interval = poll_interval
        self.deferral_timeout = deferral_timeout
        self.headers = headers

    async def execute(self, context: Context) -> Any:
        from triggers.http import raise_for_auth, request
        from triggers.job import DEFAULT_FAILURE_STATES, DEFAULT_SUCCESS_STATES, JobStatusTrigger

        what = f"{self.submit_method} {self.submit_endpoint} on {self.http_conn_id!r}"
        status, body = await request(
            self.http_conn_id,
            self.submit_method,
            self.submit_endpoint,
            self.headers,
            self.submit_json,
            what,
        )
        try:
            raise_for_auth(status, body, self.http_conn_id, what)
        except PermissionError as exc:
            raise FailTask(str(exc)) from None
        if not 200 <= status < 300:
            raise RuntimeError(f"{what}: HTTP {status}: {str(body)[:300]}")
        try:
            run_id = dotted(body, self.run_id_field)
        except (KeyError, IndexError, TypeError) as exc:
            raise FailTask(
                f"{what}: no run id at {self.run_id_field!r} in the response "
                f"({exc}); set run_id_field"
            ) from None
        self.log.info("job run started", run_id=run_id)
        self.defer(
            trigger=JobStatusTrigger(
                status_endpoint=self.status_endpoint.format(run_id=run_id),
                http_conn_id=self.http_conn_id,
                status_field=self.status_field,
                success_states=self.success_states or DEFAULT_SUCCESS_STATES,
                failure_states=self.failure_states or DEFAULT_FAILURE_STATES,
                poll_interval=self.poll_interval,
                headers=self.headers,
            ),
            method_name="execute_complete",
            kwargs={"run_id": run_id},
            timeout=self.deferral_timeout,
        )

    def execute_complete(self, context: Context, event: Any = None, run_id: Any = None) -> Any:
        result = job_result(event, f"job run {run_id}", self.error_field)
        self.log.info("job run succeeded", run_id=run_id, state=event.get("state"))
        return result


class DbtCloudRunJobOperator(BaseOperator):
    """Trigger a dbt Cloud job run (API v2) and wait for it deferred.

    Connection: ``DEFERRUN_CONN_DBT_CLOUD_DEFAULT='https://ACCOUNT:TOKEN@cloud.getdbt.com?auth=token'``.
    The result is ``{"run_id": ..., "status": 10, "status_humanized": "success", ...}``; an
    errored or cancelled run raises JobRunFailed naming the run and its state. ``timeout`` is
    how long to wait for the run (seconds). Cancelling the task cancels the run; a triggerer
    restart or failover does not. A 429 on submission (or a connection that could not be
    made) is retried after Retry-After; a 5xx or a lost answer fails the task without a retry,
    since the POST is not idempotent and dbt Cloud may have started the run anyway.
    """

    def __init__(
        self,
        *,
        job_id: int | str,
        account_id: int | str,
        conn_id: str = "dbt_cloud_default",
        check_interval: float = 10.0,
        timeout: float = 300.0,
        steps_override: list[str] | None = None,
        cause: str = "Triggered by deferrun",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        from deferrun.core.basetrigger import check_interval as checked

        self.job_id = job_id
        self.account_id = account_id
        self.conn_id = conn_id
        self.check_interval = checked(check_interval, "check_interval")
        self.timeout = timeout
        self.steps_override = steps_override
        self.cause = cause

    async def _submit(self) -> Any:
        import anyio

        from deferrun.exceptions import TransientError
        from triggers.http import excerpt, fetch, raise_for_auth

        endpoint = f"api/v2/accounts/{self.account_id}/jobs/{self.job_id}/run/"
        what = f"starting dbt Cloud job {self.job_id} on {self.conn_id!r}"
        body: dict[str, Any] = {"cause": self.cause}
        if self.steps_override is not None:
            body["steps_override"] = list(self.steps_override)
        maybe_started = (
            f"; a run of job {self.job_id} may have been started anyway: check its runs in "
            "dbt Cloud before running this task again"
        )
        for attempt in range(1, SUBMIT_ATTEMPTS + 1):
            try:
                status, answer, retry_after, _ = await fetch(
                    self.conn_id, "POST", endpoint, None, body, what
                )
            except TransientError as exc:
                if not getattr(exc, "request_unsent", False):  # sent, answer lost
                    raise FailTask(f"{exc}{maybe_started}") from None
                status, answer, retry_after = 0, None, None
                error: TransientError | None = exc
            else:
                error = None
            try:
                raise_for_auth(status, answer, self.conn_id, what)
            except PermissionError as exc:
                raise FailTask(str(exc)) from None
            if status == 429 or error is not None:  # refused before any run was started
                if attempt == SUBMIT_ATTEMPTS:
                    # nothing was started, so the task's own retries may submit again
                    raise RuntimeError(f"{error or f'{what}: HTTP 429'} ({attempt} attempts)")
                wait = retry_after if retry_after is not None else 2.0**attempt
                self.log.warning("dbt Cloud asks to retry", status=status, retry_in=wait)
                await anyio.sleep(min(wait, 300.0))
                continue
            if not 200 <= status < 300:
                raise FailTask(f"{what}: HTTP {status}: {excerpt(answer)}{maybe_started}")
            try:
                run_id = dotted(answer, "data.id")
            except (KeyError, IndexError, TypeError):
                run_id = None
            if isinstance(run_id, bool) or not (
                (isinstance(run_id, int) and run_id > 0)
                or (isinstance(run_id, str) and run_id.isdigit())
            ):
                raise FailTask(
                    f"{what}: no run id at data.id in the response ({excerpt(answer, 200)})"
                    f"{maybe_started}"
                )
            return run_id
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def execute(self, context: Context) -> Any:
        from triggers.dbt import DbtCloudRunTrigger

        run_id = await self._submit()
        self.log.info("dbt Cloud run started", run_id=run_id, job_id=self.job_id)
        self.defer(
            trigger=DbtCloudRunTrigger(
                account_id=self.account_id,
                run_id=run_id,
                conn_id=self.conn_id,
                poll_interval=self.check_interval,
            ),
            method_name="execute_complete",
            kwargs={"run_id": run_id},
            timeout=self.timeout,
        )

    def execute_complete(self, context: Context, event: Any = None, run_id: Any = None) -> Any:
        from triggers.dbt import status_name

        body = event.get("body") if isinstance(event, dict) else None
        if not isinstance(event, dict) or event.get("status") != "success":
            state = event.get("state") if isinstance(event, dict) else None
            message = (body or {}).get("status_message") if isinstance(body, dict) else None
            raise JobRunFailed(
                f"dbt Cloud run {run_id} (job {self.job_id}) ended {status_name(state)} "
                f"(status {state}){': ' + str(message) if message else ''}"
            )
        self.log.info("dbt Cloud run succeeded", run_id=run_id)
        return body
