"""A fake service shaped like dbt Cloud's v2 API, with token auth (``Authorization: Token X``).

POST /api/v2/accounts/{account}/jobs/{job}/run/ starts a run; GET .../runs/{run}/ reports its
``status`` (dbt's numbers: 1 queued, 2 starting, 3 running, 10 success, 20 error, 30
cancelled), finishing after ``polls`` status reads. The job id decides the outcome: job 20
errors, job 30 is cancelled, any other succeeds.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from services import ThreadedApp

TOKEN = "dbt-t0ken-s3cret"
ACCOUNT = 4242


@dataclass
class DbtCloudService(ThreadedApp):
    polls: int = 2
    runs: dict[int, dict[str, Any]] = field(default_factory=dict)
    requests: Counter[str] = field(default_factory=Counter)
    refused: int = 0
    _ids: Any = field(default_factory=lambda: itertools.count(7001))

    def _denied(self, request: web.Request) -> web.Response | None:
        self.requests[f"{request.method} {request.path}"] += 1
        if request.headers.get("Authorization") != f"Token {TOKEN}":
            self.refused += 1
            return web.json_response({"status": {"code": 401}, "data": None}, status=401)
        if int(request.match_info["account"]) != ACCOUNT:
            return web.json_response({"status": {"code": 404}, "data": None}, status=404)
        return None

    async def trigger(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        job = int(request.match_info["job"])
        body = await request.json()
        run_id = next(self._ids)
        final = {20: 20, 30: 30}.get(job, 10)
        self.runs[run_id] = {"job": job, "cause": body.get("cause"), "reads": 0, "final": final}
        data = {"id": run_id, "job_definition_id": job, "status": 1, "href": f"/runs/{run_id}"}
        return web.json_response({"status": {"code": 200}, "data": data})

    async def run(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        run = self.runs.get(int(request.match_info["run"]))
        if run is None:
            return web.json_response({"status": {"code": 404}, "data": None}, status=404)
        run["reads"] += 1
        status = run["final"] if run["reads"] > self.polls else (1 if run["reads"] == 1 else 3)
        data = {"id": int(request.match_info["run"]), "status": status}
        return web.json_response({"status": {"code": 200}, "data": data})

    def start(self) -> None:
        app = web.Application()
        base = "/api/v2/accounts/{account}"
        app.router.add_post(base + "/jobs/{job}/run/", self.trigger)
        app.router.add_get(base + "/runs/{run}/", self.run)
        self._serve(app, "fake-dbt-cloud")

    def uri(self, token: str = TOKEN) -> str:
        """Airflow's dbt Cloud connection shape: login = account id, password = API token."""
        return f"dbt-cloud://{ACCOUNT}:{token}@127.0.0.1:{self.port}/api"
