"""The status page's guards and its pipeline picture, on both backends: the Host header
(DNS rebinding), ``nosniff`` on every response, a confirmation before cancel and retry (no
JavaScript needed, the CSRF guard kept), read-only pages that say how to act, and the task's
pipeline as escaped, bounded SVG."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import aiohttp
import pytest
from aiohttp import web

from deferrun.client import build_task
from deferrun.core.models import TaskState
from deferrun.store import Store
from deferrun.web import graph
from deferrun.web.app import build_app
from tests.support.userland import Outcome

pytestmark = pytest.mark.anyio
TOKEN = "web-safety-token"


@asynccontextmanager
async def serving(
    store: Store, token: str | None, host: str = "127.0.0.1", allowed: Sequence[str] = ()
) -> AsyncIterator[str]:
    runner = web.AppRunner(build_app(store, token, host=host, allowed=allowed), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def submit(store: Store, name: str, after: Sequence[str] = ()) -> str:
    task = build_task(Outcome(what="ok", task_id=name, queue="nobody"), after=list(after))
    await store.submit(task)
    return task.id


async def test_host_header_must_name_this_server(store: Store) -> None:
    task_id = await submit(store, "plain")
    served = serving(store, None, allowed=["status.example"])
    async with served as base, aiohttp.ClientSession() as http:
        for host in ("evil.example", "evil.example:8780", "127.0.0.1.evil.example"):
            async with http.get(f"{base}/api/overview", headers={"Host": host}) as r:
                text = await r.text()
                assert r.status == 400, (host, text)
                assert "--allowed-host" in text and "evil.example" in text
                assert r.headers["X-Content-Type-Options"] == "nosniff"
        for host in ("status.example", "STATUS.example:443", "localhost:1", "127.0.0.1"):
            async with http.get(f"{base}/tasks/{task_id}", headers={"Host": host}) as r:
                assert r.status == 200, host
    # bound to every interface: any address is this server, a name only when allowed
    async with serving(store, None, host="0.0.0.0") as base, aiohttp.ClientSession() as http:
        for host, status in (("10.1.2.3:8780", 200), ("[::1]:8780", 200), ("evil.example", 400)):
            async with http.get(f"{base}/api/overview", headers={"Host": host}) as r:
                assert r.status == status, host


async def test_every_response_says_nosniff(store: Store) -> None:
    task_id = await submit(store, "plain")
    async with serving(store, TOKEN) as base, aiohttp.ClientSession() as http:
        for method, path, status in (
            ("GET", "/", 200),
            ("GET", f"/tasks/{task_id}", 200),
            ("GET", "/api/tasks", 200),
            ("GET", "/tasks/no-such-task", 404),  # a plain-text error
            ("GET", "/api/tasks?state=nonsense", 400),
            ("GET", "/no/such/page", 404),
            ("POST", f"/tasks/{task_id}/cancel", 403),  # refused action, plain text
            ("POST", f"/api/tasks/{task_id}/cancel", 403),
        ):
            async with http.request(method, base + path) as r:
                assert r.status == status, (path, await r.text())
                assert r.headers.get("X-Content-Type-Options") == "nosniff", path


async def test_cancel_and_retry_ask_for_confirmation(store: Store) -> None:
    up = await submit(store, "first")
    down = await submit(store, "second", after=[up])
    jar = aiohttp.CookieJar(unsafe=True)
    async with serving(store, TOKEN) as base, aiohttp.ClientSession(cookie_jar=jar) as http:
        origin = {"Origin": base}
        async with http.post(f"{base}/login", data={"token": TOKEN}, headers=origin) as r:
            assert r.status == 200
        async with http.get(f"{base}/tasks/{up}") as r:
            page = await r.text()
        csrf = page.split('name="csrf" value="')[1].split('"')[0]
        form = f"{base}/tasks/{up}/cancel"

        # the first post shows what it would do, with a form that carries the same CSRF field
        async with http.post(form, data={"csrf": csrf}, headers=origin) as r:
            confirm = await r.text()
            assert r.status == 200 and 'id="confirm"' in confirm and 'id="back"' in confirm
            assert "tasks waiting on it settle at once" in confirm
            assert f'name="csrf" value="{csrf}"' in confirm
            assert 'name="confirm" value="yes"' in confirm
        assert (await store.get_task(up)).state is TaskState.QUEUED  # type: ignore[union-attr]

        # the confirmation keeps the CSRF guard: a forged field or another origin is refused
        forged = {"csrf": "forged", "confirm": "yes"}
        async with http.post(form, data=forged, headers=origin) as r:
            assert r.status == 403
        real = {"csrf": csrf, "confirm": "yes"}
        async with http.post(form, data=real, headers={"Origin": "http://evil.example"}) as r:
            assert r.status == 403
        assert (await store.get_task(up)).state is TaskState.QUEUED  # type: ignore[union-attr]

        async with http.post(form, data=real, headers=origin) as r:
            assert r.status == 200 and "cancelled" in await r.text()
        assert (await store.get_task(up)).state is TaskState.CANCELLED  # type: ignore[union-attr]
        assert (await store.get_task(down)).state is TaskState.UPSTREAM_FAILED  # type: ignore[union-attr]

        retry = f"{base}/tasks/{up}/retry"
        async with http.post(retry, data={"csrf": csrf, "downstream": "1"}, headers=origin) as r:
            confirm = await r.text()
            assert 'name="downstream" value="1"' in confirm
            assert "every task downstream of it" in confirm
        assert (await store.get_task(up)).state is TaskState.CANCELLED  # type: ignore[union-attr]
        data = {"csrf": csrf, "downstream": "1", "confirm": "yes"}
        async with http.post(retry, data=data, headers=origin) as r:
            assert r.status == 200
        assert (await store.get_task(up)).state is TaskState.UP_FOR_RETRY  # type: ignore[union-attr]
        assert (await store.get_task(down)).state is TaskState.DEFERRED  # type: ignore[union-attr]


async def test_a_read_only_page_says_how_to_act(store: Store) -> None:
    task_id = await submit(store, "plain")
    async with (
        serving(store, None) as base,
        aiohttp.ClientSession() as http,
        http.get(f"{base}/tasks/{task_id}") as r,
    ):
        page = await r.text()
    assert 'id="how-to-act"' in page
    assert f"deferrun cancel {task_id}" in page and "--token" in page


async def test_the_task_page_draws_its_pipeline(store: Store) -> None:
    hostile = '"><script>alert(1)</script><svg onload=alert(2)>'
    a = await submit(store, "extract")
    b = await submit(store, hostile, after=[a])
    c = await submit(store, "load", after=[b])
    d = await submit(store, "report", after=[b, c])
    lone = await submit(store, "alone")
    async with serving(store, None) as base, aiohttp.ClientSession() as http:
        async with http.get(f"{base}/tasks/{b}") as r:
            page = await r.text()
        async with http.get(f"{base}/tasks/{lone}") as r:
            alone = await r.text()
    svg = page.split('<div id="pipeline-graph">')[1].split("</svg>")[0]
    for task_id in (a, b, c, d):
        assert f'href="/tasks/{task_id}"' in svg
    assert 'data-state="queued"' in svg and 'data-state="deferred"' in svg
    assert "<script>" not in svg and "<svg onload" not in svg
    assert "&lt;script&gt;" in svg
    assert svg.count('class="edge"') == 4  # a>b, b>c, b>d, c>d
    assert "<script" not in page.split("<h2>Log lines")[0]  # nothing the name brought in
    assert 'id="pipeline-graph"' not in alone


async def test_the_graph_is_bounded_and_says_what_it_cut(store: Store) -> None:
    chain = [await submit(store, "step-0")]
    for i in range(1, 6):
        chain.append(await submit(store, f"step-{i}", after=[chain[-1]]))
    drawn = await graph.walk(store, chain[-1], levels=3)
    assert drawn is not None
    assert {n.id for n in drawn.nodes.values()} == set(chain[2:])
    assert drawn.cut == ["more upstream tasks beyond 3 levels, not drawn"]
    assert sorted(n.level for n in drawn.nodes.values()) == [-3, -2, -1, 0]

    many = [await submit(store, f"source-{i}") for i in range(12)]
    sink = await submit(store, "sink", after=many)
    drawn = await graph.walk(store, sink, max_nodes=5)
    assert drawn is not None and len(drawn.nodes) == 5
    assert drawn.cut == ["8 more neighbouring tasks not drawn (at most 5 tasks)"]
    assert all(up in drawn.nodes and down in drawn.nodes for up, down in drawn.edges)
    assert re.fullmatch(r"<svg .*</svg>", graph.svg(drawn), re.S)
    assert await graph.walk(store, "no-such-task") is None
