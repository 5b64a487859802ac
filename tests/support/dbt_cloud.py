"""A fake dbt Cloud API v2 on loopback, accepting only ``Authorization: Token``.

POST /api/v2/accounts/{account}/jobs/{job}/run/ starts a run; GET .../runs/{run}/ reports its
``status`` (dbt's numbers: 1 queued, 2 starting, 3 running, 10 success, 20 error, 30
cancelled), ending after ``polls`` status reads; POST .../runs/{run}/cancel/ cancels it.
``job_id % 100`` picks the outcome: 20 errors, 30 is cancelled, 98 answers without a run id,
99 never ends until cancelled, anything else succeeds. Serves both deferrun's own
``DbtCloudRunJobOperator`` (``uri()``) and an Airflow-style user hook (``airflow_uri()``).
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.support.services import ThreadedApp

DBT_TOKEN = "dbtc-T0ken-9f8e7d6c"
ACCOUNT = 4321

#: ``job_id % 100`` -> the run's final status (0: never ends by itself); any other succeeds
OUTCOMES = {10: 10, 20: 20, 30: 30, 99: 0}


@dataclass
class DbtRun:
    id: int
    job_id: int
    outcome: int  # 10, 20 or 30; 0 never ends until cancelled
    polls_to_finish: int
    cause: str = ""
    steps: list[str] | None = None
    polls: int = 0
    status: int = 1
    cancels: int = 0

    def __getitem__(self, name: str) -> Any:
        """``run["cause"]``: some tests read a run as the JSON-ish dict a user hook sees."""
        return getattr(self, name)


@dataclass
class FakeDbtCloud(ThreadedApp):
    """``throttle_polls`` answers that many run polls with 429 + Retry-After ``retry_after`` s
    first; ``throttle_submits`` and ``throttle_cancels`` do the same for submissions and
    cancels; ``fail_submits`` answers 502 *after* starting the run, as a flaky gateway would.
    ``requests`` counts ``"METHOD path"``; ``refused`` counts requests without the token."""

    polls: int = 2  # status reads before a new run ends
    throttle_polls: int = 0
    throttle_submits: int = 0
    throttle_cancels: int = 0
    fail_submits: int = 0
    cancel_calls: int = 0
    retry_after: int = 1
    refused: int = 0
    runs: dict[int, DbtRun] = field(default_factory=dict)
    requests: Counter[str] = field(default_factory=Counter)
    poll_times: list[float] = field(default_factory=list)
    submit_times: list[float] = field(default_factory=list)
    seen_auth: list[str] = field(default_factory=list)
    seen_headers: list[dict[str, str]] = field(default_factory=list)
    _ids: Any = field(default_factory=lambda: itertools.count(70001))

    def _denied(self, request: web.Request) -> web.Response | None:
        self.requests[f"{request.method} {request.path}"] += 1
        header = request.headers.get("Authorization", "")
        self.seen_auth.append(header.split(" ", 1)[0])
        self.seen_headers.append(dict(request.headers))
        if header != f"Token {DBT_TOKEN}":
            self.refused += 1
            return web.json_response(
                {
                    "status": {"code": 401, "is_success": False, "user_message": "Invalid token."},
                    "data": None,
                },
                status=401,
            )
        if int(request.match_info["account"]) != ACCOUNT:
            return web.json_response({"status": {"code": 404}, "data": None}, status=404)
        return None

    def _throttled(self) -> web.Response:
        return web.json_response(
            {"status": {"code": 429, "user_message": "Too many requests"}},
            status=429,
            headers={"Retry-After": str(self.retry_after)},
        )

    async def trigger_run(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        self.submit_times.append(time.monotonic())
        if self.throttle_submits > 0:
            self.throttle_submits -= 1
            return self._throttled()
        body = await request.json()
        job_id = int(request.match_info["job"])
        run = DbtRun(
            id=next(self._ids),
            job_id=job_id,
            outcome=OUTCOMES.get(job_id % 100, 10),
            polls_to_finish=self.polls,
            cause=body.get("cause", ""),
            steps=body.get("steps_override"),
        )
        self.runs[run.id] = run
        if self.fail_submits > 0:
            self.fail_submits -= 1
            return web.Response(status=502, text="bad gateway")
        if job_id % 100 == 98:  # a malformed answer: no run id
            return web.json_response({"data": {"id": None}})
        data = {
            "id": run.id,
            "status": 1,
            "job_id": job_id,
            "job_definition_id": job_id,
            "href": f"/runs/{run.id}",
        }
        return web.json_response({"status": {"code": 200}, "data": data})

    async def get_run(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        self.poll_times.append(time.monotonic())
        if self.throttle_polls > 0:
            self.throttle_polls -= 1
            return self._throttled()
        run = self.runs.get(int(request.match_info["run"]))
        if run is None:
            return web.json_response({"status": {"code": 404}, "data": None}, status=404)
        run.polls += 1
        if run.status < 10:
            if run.polls > run.polls_to_finish and run.outcome:
                run.status = run.outcome
            else:
                run.status = min(3, run.polls)
        message = {20: "Database Error in model orders", 30: "Cancelled by user"}.get(run.status)
        return web.json_response(
            {
                "status": {"code": 200},
                "data": {
                    "id": run.id,
                    "status": run.status,
                    "status_message": message,
                    "href": f"https://cloud.example/runs/{run.id}",
                },
            }
        )

    async def cancel_run(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        self.cancel_calls += 1
        if self.throttle_cancels > 0:
            self.throttle_cancels -= 1
            return self._throttled()
        run = self.runs.get(int(request.match_info["run"]))
        if run is None:
            return web.json_response({"status": {"code": 404}, "data": None}, status=404)
        run.cancels += 1
        if run.status < 10:
            run.status = 30
        return web.json_response({"data": {"id": run.id, "status": run.status}})

    def start(self) -> None:
        app = web.Application()
        base = "/api/v2/accounts/{account}"
        app.router.add_post(base + "/jobs/{job}/run/", self.trigger_run)
        app.router.add_get(base + "/runs/{run}/", self.get_run)
        app.router.add_post(base + "/runs/{run}/cancel/", self.cancel_run)
        self._serve(app, "fake-dbt-cloud")

    def uri(self, token: str = DBT_TOKEN, auth: str | None = "token", extra: str = "") -> str:
        """deferrun's HTTP connection shape: login = account id, password = API token."""
        query = f"?auth={auth}" if auth else ""
        if extra:
            query += ("&" if query else "?") + extra
        return f"http://{ACCOUNT}:{token}@127.0.0.1:{self.port}{query}"

    def airflow_uri(self, token: str = DBT_TOKEN) -> str:
        """Airflow's dbt Cloud connection shape: login = account id, password = API token,
        schema (the URI's path) = the API's base path."""
        return f"dbt-cloud://{ACCOUNT}:{token}@127.0.0.1:{self.port}/api"
