"""External job status triggers: REST job services (dbt Cloud, Databricks-style) and AWS Glue.

Both fire on a terminal state with ``{"status": "success" | "failed", "state": raw,
"body": {...}}``; deciding what a failed run means is the operator's job (RunJobOperator and
JobRunSensor raise).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from deferrun.connections.clients import aws_client, check_endpoint, dotted
from deferrun.core.basetrigger import PollingTrigger, TriggerEvent, check_interval
from triggers.http import (
    MAX_BODY_BYTES,
    answer_of,
    check_body_limit,
    excerpt,
    fetch,
    raise_for_auth,
    raise_for_redirect,
    raise_transient,
    request_key,
)
from triggers.s3 import classify

DEFAULT_SUCCESS_STATES = ("SUCCESS", "SUCCEEDED", "SUCCESSFUL", "COMPLETED", "COMPLETE", "DONE")
DEFAULT_FAILURE_STATES = (
    "FAILED",
    "FAILURE",
    "ERROR",
    "CANCELLED",
    "CANCELED",
    "TIMEOUT",
    "TIMED_OUT",
    "TIMEDOUT",
    "STOPPED",
    "INTERNAL_ERROR",
    "SKIPPED",
)


def _norm(states: Sequence[str]) -> set[str]:
    return {str(s).upper() for s in states}


def terminal_event(
    state: Any, body: Any, success: set[str], failure: set[str]
) -> TriggerEvent | None:
    key = str(state).upper()
    if key in success:
        return TriggerEvent({"status": "success", "state": state, "body": body})
    if key in failure:
        return TriggerEvent({"status": "failed", "state": state, "body": body})
    return None


class JobStatusTrigger(PollingTrigger):
    """Polls a job run's status endpoint until ``status_field`` reaches a terminal state.

    ``status_field`` is a dotted path into the JSON body (``"state.life_cycle_state"`` for
    Databricks, ``"data.status_humanized"`` for dbt Cloud). States compare case-insensitively.
    A 404 is tolerated for ``not_found_grace`` seconds (run ids can take a moment to appear),
    then fails the task; 401/403 fail at once; 5xx, 408, 429 and network errors are retried
    (at least ``Retry-After`` apart on 429/503). ``status_endpoint`` is a path under the
    connection's base URL (see HttpTrigger); a body over ``max_body_bytes`` fails the task.
    ``headers`` go with every poll, beside the connection's auth and ``?header.*`` headers.
    """

    def __init__(
        self,
        status_endpoint: str,
        http_conn_id: str,
        status_field: str = "status",
        success_states: Sequence[str] = DEFAULT_SUCCESS_STATES,
        failure_states: Sequence[str] = DEFAULT_FAILURE_STATES,
        poll_interval: float = 10.0,
        not_found_grace: float = 60.0,
        max_body_bytes: int = MAX_BODY_BYTES,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status_endpoint = check_endpoint(status_endpoint, "status_endpoint")
        self.http_conn_id = http_conn_id
        self.status_field = status_field
        self.success_states = list(success_states)
        self.failure_states = list(failure_states)
        self.poll_interval = check_interval(poll_interval)
        if isinstance(not_found_grace, bool) or not isinstance(not_found_grace, int | float):
            raise ValueError(f"not_found_grace must be seconds, got {not_found_grace!r}")
        if not math.isfinite(not_found_grace) or not_found_grace < 0:
            raise ValueError(f"not_found_grace must be finite and >= 0, got {not_found_grace!r}")
        self.not_found_grace = not_found_grace
        self.max_body_bytes = check_body_limit(max_body_bytes)
        self.headers = headers
        self._first_poll: float | None = None

    def shared_poll_key(self) -> str:
        """Tasks waiting on one run share one status request."""
        return request_key(
            self.http_conn_id, "GET", self.status_endpoint, self.headers, None, self.max_body_bytes
        )

    async def poll(self) -> TriggerEvent | None:
        return answer_of(await type(self).poll_many([self]))

    @classmethod
    async def poll_many(cls, triggers: list[Any]) -> list[TriggerEvent | BaseException | None]:
        """One status request for every trigger of a shared poll; each reads its own field
        and states from the shared body."""
        first = triggers[0]
        what = f"job status {first.status_endpoint} on {first.http_conn_id!r}"
        now = time.monotonic()
        for t in triggers:
            if t._first_poll is None:
                t._first_poll = now
        status, body, retry_after, location = await fetch(
            first.http_conn_id,
            "GET",
            first.status_endpoint,
            first.headers,
            None,
            what,
            first.max_body_bytes,
        )
        raise_for_auth(status, body, first.http_conn_id, what)
        raise_transient(status, retry_after, what)
        raise_for_redirect(status, location, what)
        if status == 404:
            return [t._not_found(what, now) for t in triggers]
        if not 200 <= status < 300:
            raise RuntimeError(f"{what}: HTTP {status}: {excerpt(body)}")
        results: list[TriggerEvent | BaseException | None] = []
        for t in triggers:
            try:
                results.append(t._terminal(body, what))
            except ValueError as exc:
                results.append(exc)
        return results

    def _not_found(self, what: str, now: float) -> LookupError | None:
        assert self._first_poll is not None
        if now - self._first_poll > self.not_found_grace:
            return LookupError(
                f"{what}: the job run was not found (HTTP 404 for {self.not_found_grace:g}s)"
            )
        return None

    def _terminal(self, body: Any, what: str) -> TriggerEvent | None:
        try:
            state = dotted(body, self.status_field)
        except (KeyError, IndexError, TypeError) as exc:
            raise ValueError(
                f"{what}: {exc}; set status_field to where the run's state is"
            ) from None
        event = terminal_event(state, body, _norm(self.success_states), _norm(self.failure_states))
        if event is None:
            self.log.debug("job still running", state=state)
        return event


class GlueJobRunTrigger(PollingTrigger):
    """Waits for an AWS Glue job run (``glue.get_job_run``) to reach a terminal state."""

    SUCCESS = ("SUCCEEDED",)
    FAILURE = ("FAILED", "ERROR", "STOPPED", "TIMEOUT", "EXPIRED")

    def __init__(
        self,
        job_name: str,
        run_id: str,
        aws_conn_id: str = "aws_default",
        poll_interval: float = 10.0,
    ) -> None:
        self.job_name = job_name
        self.run_id = run_id
        self.aws_conn_id = aws_conn_id
        self.poll_interval = check_interval(poll_interval)

    async def poll(self) -> TriggerEvent | None:
        what = f"Glue job {self.job_name!r} run {self.run_id!r}"
        try:
            client = await aws_client("glue", self.aws_conn_id)
            response = await client.get_job_run(JobName=self.job_name, RunId=self.run_id)
        except Exception as exc:
            raise classify(exc, what) from exc
        run = response["JobRun"]
        body = {
            k: v
            for k, v in run.items()
            if k in ("Id", "JobName", "JobRunState", "ErrorMessage", "ExecutionTime", "Attempt")
        }
        return terminal_event(run["JobRunState"], body, set(self.SUCCESS), set(self.FAILURE))


__all__ = [
    "GlueJobRunTrigger",
    "JobStatusTrigger",
]
