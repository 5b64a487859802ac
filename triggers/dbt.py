"""dbt Cloud (API v2): wait for a job run, and cancel it when a user cancels the waiting task.

Run statuses: 1 queued, 2 starting, 3 running, 10 success, 20 error, 30 cancelled.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from deferrun.core.basetrigger import TriggerEvent
from deferrun.exceptions import TransientError
from triggers.http import excerpt, fetch, raise_for_auth, raise_transient
from triggers.job import JobStatusTrigger

SUCCESS, ERROR, CANCELLED = 10, 20, 30
STATUS_NAMES = {
    1: "queued",
    2: "starting",
    3: "running",
    10: "success",
    20: "error",
    30: "cancelled",
}


def run_endpoint(account_id: int | str, run_id: int | str) -> str:
    return f"api/v2/accounts/{account_id}/runs/{run_id}/"


def status_name(status: Any) -> str:
    try:
        return STATUS_NAMES.get(int(status), str(status))
    except (TypeError, ValueError):
        return str(status)


class DbtCloudRunTrigger(JobStatusTrigger):
    """Polls ``GET /api/v2/accounts/{account}/runs/{run}/`` until ``data.status`` is 10/20/30.

    Event: ``{"status": "success" | "failed", "state": code, "body": ...}`` (JobStatusTrigger's).
    When a user cancels the waiting task, it POSTs ``.../runs/{run}/cancel/``; a triggerer
    restart or failover never does (the run goes on and another triggerer keeps waiting).
    """

    def __init__(
        self,
        account_id: int | str,
        run_id: int | str,
        conn_id: str = "dbt_cloud_default",
        poll_interval: float = 10.0,
    ) -> None:
        super().__init__(
            status_endpoint=run_endpoint(account_id, run_id),
            http_conn_id=conn_id,
            status_field="data.status",
            success_states=[str(SUCCESS)],
            failure_states=[str(ERROR), str(CANCELLED)],
            poll_interval=poll_interval,
        )
        self.account_id = account_id
        self.run_id = run_id

    @classmethod
    async def poll_many(cls, triggers: list[Any]) -> list[TriggerEvent | BaseException | None]:
        """JobStatusTrigger's shared status request; each event reshaped to the run's summary."""
        results = await super().poll_many(triggers)
        return [
            t._summary(r) if isinstance(r, TriggerEvent) else r
            for t, r in zip(triggers, results, strict=True)
        ]

    def _summary(self, event: TriggerEvent) -> TriggerEvent:
        body = event.payload.get("body") or {}
        data = body.get("data") if isinstance(body, dict) else None
        event.payload["body"] = {
            "run_id": self.run_id,
            "status": event.payload["state"],
            "status_humanized": status_name(event.payload["state"]),
            "status_message": (data or {}).get("status_message"),
            "href": (data or {}).get("href"),
        }
        return event

    async def on_task_cancelled(self) -> None:
        # In a task of its own (shielded): the triggerer's cleanup limit may stop waiting for
        # us, but the retries go on for up to CANCEL_RETRY_SECONDS.
        job = asyncio.get_running_loop().create_task(
            cancel_run_retrying(self.http_conn_id, self.account_id, self.run_id, self.log)
        )
        _CANCELLING.add(job)
        job.add_done_callback(_CANCELLING.discard)
        await asyncio.shield(job)


CANCEL_RETRY_SECONDS = 60.0
_CANCELLING: set[asyncio.Task[None]] = set()


async def cancel_run_retrying(
    conn_id: str, account_id: int | str, run_id: int | str, log: Any
) -> None:
    """:func:`cancel_run`, retrying 429/5xx/network errors (Retry-After honoured, else
    backoff) for up to CANCEL_RETRY_SECONDS; logs an error naming the run if it gives up."""
    deadline = time.monotonic() + CANCEL_RETRY_SECONDS
    attempt = 0
    while True:
        attempt += 1
        try:
            await cancel_run(conn_id, account_id, run_id)
        except TransientError as exc:
            wait = exc.retry_after if exc.retry_after is not None else min(0.5 * 2**attempt, 10)
            if time.monotonic() + wait > deadline:
                log.error(
                    f"dbt Cloud run {run_id} was NOT cancelled after {attempt} attempts; "
                    "cancel it in dbt Cloud",
                    run_id=run_id,
                    error=str(exc),
                )
                return
            log.warning("cancelling the dbt Cloud run failed; retrying", error=str(exc))
            await asyncio.sleep(wait)
        except Exception as exc:
            log.error(
                f"dbt Cloud run {run_id} was NOT cancelled; cancel it in dbt Cloud",
                run_id=run_id,
                error=str(exc),
            )
            return
        else:
            log.info("dbt Cloud run cancelled because its task was cancelled", run_id=run_id)
            return


async def cancel_run(conn_id: str, account_id: int | str, run_id: int | str) -> None:
    """``POST .../runs/{run}/cancel/``; raises (with the reason) if dbt Cloud refuses."""
    endpoint = run_endpoint(account_id, run_id) + "cancel/"
    what = f"cancelling dbt Cloud run {run_id} on {conn_id!r}"
    status, body, retry_after, _ = await fetch(conn_id, "POST", endpoint, None, None, what)
    raise_for_auth(status, body, conn_id, what)
    raise_transient(status, retry_after, what)
    if not 200 <= status < 300:
        raise RuntimeError(f"{what}: HTTP {status}: {excerpt(body)}")


__all__ = ["DbtCloudRunTrigger", "cancel_run", "cancel_run_retrying", "status_name"]
