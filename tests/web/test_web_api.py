"""The status page's JSON API and HTML on both backends: views, paging, redaction, actions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from deferrun.client import build_task
from deferrun.core.models import TaskState
from deferrun.store import Store
from deferrun.web.app import build_app
from tests.support.webland import SECRETS, SecretOp, every_state

pytestmark = pytest.mark.anyio
TOKEN = "web-token-for-tests"


@asynccontextmanager
async def serving(store: Store, token: str | None) -> AsyncIterator[str]:
    runner = web.AppRunner(build_app(store, token), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def get(http: aiohttp.ClientSession, url: str, status: int = 200) -> Any:
    async with http.get(url) as r:
        text = await r.text()
        assert r.status == status, text
        for secret in SECRETS:
            assert secret not in text, f"{secret} shown at {url}"
        return await r.json() if r.content_type == "application/json" else text


async def test_views_paging_and_redaction(store: Store) -> None:
    ids = await every_state(store)
    async with serving(store, TOKEN) as base, aiohttp.ClientSession() as http:
        overview = await get(http, base + "/api/overview")
        assert {s: overview["counts"][s] for s in ids} == {s: 1 for s in ids}
        assert overview["oldest"]["task_id"] == ids["deferred"]

        # keyset paging: two at a time, every task once, newest first
        seen: list[str] = []
        url = base + "/api/tasks?limit=2"
        for _ in range(20):
            page = await get(http, url)
            seen += [t["id"] for t in page["tasks"]]
            if page["next"] is None:
                break
            url = base + "/api/tasks?limit=2&page=" + page["next"]
        assert sorted(seen) == sorted(ids.values()) and len(seen) == len(set(seen))
        assert seen[0] == ids["queued"]  # submitted last
        only = await get(http, base + "/api/tasks?state=deferred")
        assert [t["id"] for t in only["tasks"]] == [ids["deferred"]]
        named = await get(http, base + "/api/tasks?name=failed-task&queue=manual")
        assert [t["id"] for t in named["tasks"]] == [ids["failed"]]
        assert (await get(http, base + "/api/tasks?queue=nope"))["tasks"] == []
        await get(http, base + "/api/tasks?state=bogus", status=400)

        task = await get(http, base + f"/api/tasks/{ids['deferred']}")
        assert (
            task["state"] == "deferred"
            and task["trigger_classpath"] == "tests.support.userland.NeverTrigger"
        )
        assert task["kwargs"]["password"] == "***" and "***" in task["kwargs"]["dsn"]
        assert task["kwargs"]["headers"]["Authorization"] == "***"
        assert "***" in task["trigger_kwargs"]["marker"]
        assert task["trigger_timeout_in"] > 3000
        failed = await get(http, base + f"/api/tasks/{ids['failed']}")
        assert "Traceback" in failed["error"] and failed["downstream"][0]["state"] == (
            "upstream_failed"
        )
        success = await get(http, base + f"/api/tasks/{ids['success']}")
        assert success["result"]["rows"] == 3 and success["result"]["token"] == "***"

        logs = await get(http, base + f"/api/tasks/{ids['deferred']}/logs")
        assert len(logs) == 4 and "***" in logs[0]["line"]
        # quoted secrets in free text keep their quotes; structured fields are redacted by key
        assert "{'password': '***'}" in logs[2]["line"] and 'api_key: "***"' in logs[2]["line"]
        assert logs[3]["message"] == "info connecting password=*** api_key=*** attempt=2"
        assert (
            await get(http, base + f"/api/tasks/{ids['deferred']}/logs?after={logs[3]['id']}") == []
        )

        triggers = await get(
            http, base + "/api/triggers?classpath=tests.support.userland.NeverTrigger"
        )
        assert triggers["classes"][0]["count"] == 1 and len(triggers["triggers"]) == 1

        # every page, redacted too
        for path in [
            "/",
            "/tasks",
            "/triggers?classpath=tests.support.userland.NeverTrigger",
            "/login",
        ] + [f"/tasks/{i}" for i in ids.values()]:
            html = await get(http, base + path)
            assert "<html" in html
        await get(http, base + "/tasks/nope", status=404)

        # the HTML list pages by 50: follow its "next page" link
        await store.submit_many([build_task(SecretOp(queue="bulk")) for _ in range(55)])
        first = await get(http, base + "/tasks?queue=bulk")
        assert first.count('href="/tasks/') == 50
        link = first.split('id="next" href="')[1].split('"')[0].replace("&amp;", "&")
        second = await get(http, base + link)
        assert second.count('href="/tasks/') == 5 and 'id="next"' not in second


async def test_actions_need_the_token(store: Store) -> None:
    ids = await every_state(store)
    async with serving(store, None) as base, aiohttp.ClientSession() as http:
        async with http.post(f"{base}/api/tasks/{ids['deferred']}/cancel") as r:
            assert r.status == 403 and "read-only" in (await r.json())["error"]
        assert "Cancel</button>" not in await get(http, f"{base}/tasks/{ids['deferred']}")

    jar = aiohttp.CookieJar(unsafe=True)  # keep cookies of 127.0.0.1, as a browser does
    async with serving(store, TOKEN) as base, aiohttp.ClientSession(cookie_jar=jar) as http:
        url = f"{base}/api/tasks/{ids['deferred']}/cancel"
        async with http.post(url, headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 403
        async with http.post(url) as r:
            assert r.status == 403
        # a form post from another site, even with a session cookie, is refused
        async with http.post(
            f"{base}/tasks/{ids['deferred']}/cancel",
            data={"csrf": "x"},
            headers={"Origin": "http://evil.example"},
        ) as r:
            assert r.status == 403
        assert (await store.get_task(ids["deferred"])).state is TaskState.DEFERRED  # type: ignore[union-attr]

        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with http.post(url, headers=auth) as r:
            assert r.status == 200 and (await r.json())["task_ids"] == [ids["deferred"]]
        assert (await store.get_task(ids["deferred"])).state is TaskState.CANCELLED  # type: ignore[union-attr]
        async with http.post(url, headers=auth) as r:
            assert r.status == 409  # already ended
        lines = [line for _, _, line in await store.task_logs(ids["deferred"])]
        assert any(line.startswith("cancel by 127.0.0.1 at ") for line in lines)

        retry = f"{base}/api/tasks/{ids['failed']}/retry?downstream=1"
        async with http.post(retry, headers=auth) as r:
            assert r.status == 200
            assert (await r.json())["task_ids"] == [ids["failed"], ids["upstream_failed"]]
        assert (await store.get_task(ids["upstream_failed"])).state is TaskState.DEFERRED  # type: ignore[union-attr]

        # the browser way: sign in (SameSite cookie), then a same-origin form with its CSRF field
        origin = {"Origin": base}
        async with http.post(f"{base}/login", data={"token": "wrong"}, headers=origin) as r:
            assert "wrong token" in await r.text()
        async with http.post(
            f"{base}/login", data={"token": TOKEN, "next": "/"}, headers=origin
        ) as r:
            assert r.status == 200
        page = await get(http, f"{base}/tasks/{ids['queued']}")
        csrf = page.split('name="csrf" value="')[1].split('"')[0]
        form = f"{base}/tasks/{ids['queued']}/cancel"
        async with http.post(form, data={"csrf": "forged"}, headers=origin) as r:
            assert r.status == 403
        async with http.post(form, data={"csrf": csrf}) as r:  # no Origin, no Referer
            assert r.status == 403
        async with http.post(form, data={"csrf": csrf}, headers=origin) as r:
            assert r.status == 200 and 'id="confirm"' in await r.text()  # asks first
        assert (await store.get_task(ids["queued"])).state is TaskState.QUEUED  # type: ignore[union-attr]
        confirmed = {"csrf": csrf, "confirm": "yes"}
        async with http.post(form, data=confirmed, headers=origin) as r:
            assert r.status == 200 and "cancelled" in await r.text()
        assert (await store.get_task(ids["queued"])).state is TaskState.CANCELLED  # type: ignore[union-attr]
