"""Ready-made operators. ``RunJobOperator``: start an external job run, wait for it deferred."""

from __future__ import annotations

from typing import Any

from deferrun.baseoperator import BaseOperator, Context
from deferrun.exceptions import FailTask
from deferrun.sensors import JobRunFailed, job_result
from deferrun.shared_clients import dotted

__all__ = ["JobRunFailed", "RunJobOperator"]


class RunJobOperator(BaseOperator):
    """POST to ``submit_endpoint`` to start a run, then defer until the run ends.

    The run id is read from the response at ``run_id_field`` (dotted path) and substituted into
    ``status_endpoint`` (``"runs/{run_id}"``). The task's result is the final status body; a
    failed run raises JobRunFailed with its state and error (retries re-submit the job).
    Bad credentials fail at once without retrying.
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

    async def execute(self, context: Context) -> Any:
        from triggers.http import raise_for_auth, request
        from triggers.job import DEFAULT_FAILURE_STATES, DEFAULT_SUCCESS_STATES, JobStatusTrigger

        what = f"{self.submit_method} {self.submit_endpoint} on {self.http_conn_id!r}"
        status, body = await request(
            self.http_conn_id,
            self.submit_method,
            self.submit_endpoint,
            None,
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
            ),
            method_name="execute_complete",
            kwargs={"run_id": run_id},
            timeout=self.deferral_timeout,
        )

    def execute_complete(self, context: Context, event: Any = None, run_id: Any = None) -> Any:
        result = job_result(event, f"job run {run_id}", self.error_field)
        self.log.info("job run succeeded", run_id=run_id, state=event.get("state"))
        return result
