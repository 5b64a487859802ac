"""Real servers on loopback for trigger tests: an HTTP/job service (aiohttp) and moto."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BasicAuth, web

USER, PASSWORD = "svc-user", "s3cr3t-pa55word"


@dataclass
class Run:
    id: str
    outcome: str
    polls_to_finish: int
    polls: int = 0


@dataclass
class ThreadedApp:
    """An aiohttp app served on a loopback port from a thread of its own, for tests."""

    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    def _serve(self, app: web.Application, name: str) -> None:
        started = threading.Event()

        def serve() -> None:
            loop = self._loop = asyncio.new_event_loop()
            runner = web.AppRunner(app, access_log=None)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            started.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, name=name, daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError(f"{name} did not start")

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)


@dataclass
class FakeServices(ThreadedApp):
    """Behaves like a small HTTP API and a job service (dbt Cloud / Databricks-shaped)."""

    ready: dict[str, Any] = field(default_factory=dict)
    flaky_failures: dict[str, int] = field(default_factory=dict)
    requests: Counter[str] = field(default_factory=Counter)
    runs: dict[str, Run] = field(default_factory=dict)
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        try:
            auth = BasicAuth.decode(header)
        except ValueError:
            return False
        return auth.login == USER and auth.password == PASSWORD

    def _guard(self, request: web.Request) -> web.Response | None:
        self.requests[request.path] += 1
        if not self._authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        return None

    async def health(self, request: web.Request) -> web.Response:
        if (denied := self._guard(request)) is not None:
            return denied
        name = request.match_info["name"]
        if name not in self.ready:
            return web.json_response({"error": f"{name} not found"}, status=404)
        return web.json_response({"name": name, **self.ready[name]})

    async def flaky(self, request: web.Request) -> web.Response:
        if (denied := self._guard(request)) is not None:
            return denied
        name = request.match_info["name"]
        left = self.flaky_failures.get(name, 0)
        if left > 0:
            self.flaky_failures[name] = left - 1
            return web.Response(status=503, text="upstream busy")
        return web.json_response({"ok": True, "name": name})

    async def slow(self, request: web.Request) -> web.Response:
        self.requests[request.path] += 1
        await asyncio.sleep(float(request.query.get("seconds", "2")))
        return web.json_response({"slow": True})

    async def bad_request(self, request: web.Request) -> web.Response:
        self.requests[request.path] += 1
        return web.json_response({"error": "missing parameter 'x'"}, status=400)

    async def submit_run(self, request: web.Request) -> web.Response:
        if (denied := self._guard(request)) is not None:
            return denied
        body = await request.json()
        run = Run(
            id=f"run-{next(self._ids)}",
            outcome=body.get("outcome", "success"),
            polls_to_finish=int(body.get("polls", 2)),
        )
        self.runs[run.id] = run
        return web.json_response({"data": {"id": run.id, "status": "QUEUED"}}, status=201)

    async def run_status(self, request: web.Request) -> web.Response:
        if (denied := self._guard(request)) is not None:
            return denied
        run = self.runs.get(request.match_info["run_id"])
        if run is None:
            return web.json_response({"error": "run not found"}, status=404)
        run.polls += 1
        if run.polls == 1:
            state = "PENDING"
        elif run.polls <= run.polls_to_finish:
            state = "RUNNING"
        else:
            state = "SUCCESS" if run.outcome == "success" else "FAILED"
        body: dict[str, Any] = {"id": run.id, "state": {"life_cycle": state}}
        if state == "FAILED":
            body["error"] = "division by zero in model orders"
        return web.json_response(body)

    def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health/{name}", self.health)
        app.router.add_get("/flaky/{name}", self.flaky)
        app.router.add_get("/slow", self.slow)
        app.router.add_get("/bad-request", self.bad_request)
        app.router.add_post("/api/runs", self.submit_run)
        app.router.add_get("/api/runs/{run_id}", self.run_status)
        self._serve(app, "fake-services")

    def uri(self, user: str = USER, password: str = PASSWORD) -> str:
        return f"http://{user}:{password}@127.0.0.1:{self.port}"


@dataclass
class Moto:
    endpoint: str
    key: str
    secret: str
    server: Any

    def uri(self, key: str | None = None, secret: str | None = None) -> str:
        from urllib.parse import quote

        return (
            f"aws://{quote(key or self.key, safe='')}:{quote(secret or self.secret, safe='')}"
            f"@?region_name=us-east-1&endpoint_url={quote(self.endpoint, safe='')}"
        )

    def boto(self, service: str) -> Any:
        import boto3

        return boto3.client(
            service,
            region_name="us-east-1",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
        )


def start_moto(port: int) -> Moto:
    """moto's server with IAM authentication enforced after a user and key are created."""
    import boto3
    from moto import settings
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    iam = boto3.client(
        "iam",
        region_name="us-east-1",
        endpoint_url=endpoint,
        aws_access_key_id="bootstrap",
        aws_secret_access_key="bootstrap",
    )
    iam.create_user(UserName="deferrun-tests")
    iam.put_user_policy(
        UserName="deferrun-tests",
        PolicyName="all",
        PolicyDocument=(
            '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", '
            '"Resource": "*"}]}'
        ),
    )
    key = iam.create_access_key(UserName="deferrun-tests")["AccessKey"]
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # from now on, every request must be signed
    return Moto(
        endpoint=endpoint, key=key["AccessKeyId"], secret=key["SecretAccessKey"], server=server
    )


@dataclass
class Hit:
    at: float  # time.monotonic() when the request arrived
    path_qs: str
    authorization: str | None


@dataclass
class HostileApi(ThreadedApp):
    """An aiohttp server that misbehaves on demand and records every request it receives.

    Routes (any prefix): ``.../ok``; ``.../429?ra=N&times=K`` (429 with ``Retry-After: N``
    for the first K hits, then 200; ``ra=date:N`` sends an HTTP-date N s ahead; no ``ra``, no
    header); ``.../503?ra=N&times=K``; ``.../big?n=BYTES`` (JSON, Content-Length set);
    ``.../stream?n=BYTES`` (chunked, no Content-Length); ``.../text?n=BYTES``;
    ``.../echo401`` (401 whose body echoes the Authorization header); ``.../redirect?to=URL``.
    """

    hits: list[Hit] = field(default_factory=list)
    _counts: Counter[str] = field(default_factory=Counter)

    def paths(self, suffix: str) -> list[Hit]:
        return [h for h in self.hits if h.path_qs.split("?")[0].endswith(suffix)]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        import json
        import time
        from email.utils import formatdate

        self.hits.append(
            Hit(time.monotonic(), request.path_qs, request.headers.get("Authorization"))
        )
        path = request.path
        self._counts[path] += 1
        q = request.query
        if path.endswith(("/429", "/503")):
            status = int(path[-3:])
            if self._counts[path] <= int(q.get("times", "1000000")):
                headers = {}
                ra = q.get("ra")
                if ra and ra.startswith("date:"):
                    headers["Retry-After"] = formatdate(time.time() + float(ra[5:]), usegmt=True)
                elif ra:
                    headers["Retry-After"] = ra
                return web.json_response({"error": "slow down"}, status=status, headers=headers)
            return web.json_response({"status": "SUCCESS", "hits": self._counts[path]})
        if path.endswith("/big"):
            pad = max(0, int(q["n"]) - 40)
            return web.json_response({"status": "SUCCESS", "pad": "x" * pad})
        if path.endswith("/stream"):
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            left = int(q["n"])
            await resp.write(b'{"pad": "')
            while left > 0:
                part = min(left, 65536)
                await resp.write(b"x" * part)
                left -= part
            await resp.write(b'"}')
            await resp.write_eof()
            return resp
        if path.endswith("/text"):
            return web.Response(text="t" * int(q["n"]), content_type="text/plain")
        if path.endswith("/echo401"):
            body = {"error": "bad creds", "you_sent": request.headers.get("Authorization")}
            return web.Response(text=json.dumps(body), status=401)
        if path.endswith("/redirect"):
            raise web.HTTPFound(location=q["to"])
        if path.endswith("/ok"):
            return web.json_response({"status": "SUCCESS"})
        return web.json_response({"error": "no such route"}, status=418)

    def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._serve(app, "hostile-api")
