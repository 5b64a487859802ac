"""dbt Cloud (API v2): wait for a job run, and cancel it when a user cancels the waiting task.

Run statuses: 1 queued, 2 starting, 3 running, 10 success, 20 error, 30 cancelled.
"""

from __future__ import annotations

from typing import Any

from deferrun.basetrigger import TriggerEvent
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
        await cancel_run(self.http_conn_id, self.account_id, self.run_id)
        self.log.info("dbt Cloud run cancelled because its task was cancelled", run_id=self.run_id)


async def cancel_run(conn_id: str, account_id: int | str, run_id: int | str) -> None:
    """``POST .../runs/{run}/cancel/``; raises (with the reason) if dbt Cloud refuses."""
    endpoint = run_endpoint(account_id, run_id) + "cancel/"
    what = f"cancelling dbt Cloud run {run_id} on {conn_id!r}"
    status, body, retry_after, _ = await fetch(conn_id, "POST", endpoint, None, None, what)
    raise_for_auth(status, body, conn_id, what)
    raise_transient(status, retry_after, what)
    if not 200 <= status < 300:
        raise RuntimeError(f"{what}: HTTP {status}: {excerpt(body)}")


__all__ = ["DbtCloudRunTrigger", "cancel_run", "status_name"]
