"""The status page under hostile input: non-ASCII credentials, open redirects, huge numbers,
forged audit addresses, brute force, and what a task page may say (both backends)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import anyio
import pytest

from deferrun.store import Store, make_store
from deferrun.web.app import FAILURES, _session_cookie
from tests.support.pgcluster import free_port
from tests.support.processes import REPO, wait_until
from tests.support.webland import every_state
from tests.web.test_web_api import TOKEN, get, serving

pytestmark = pytest.mark.anyio


async def test_non_ascii_credentials_are_refused_not_a_server_error(store: Store) -> None:
    ids = await every_state(store, running=False)
    jar = aiohttp.CookieJar(unsafe=True)
    async with serving(store, TOKEN) as base, aiohttp.ClientSession(cookie_jar=jar) as http:
        origin = {"Origin": base}
        async with http.post(f"{base}/login", data={"token": "é"}, headers=origin) as r:
            assert r.status == 200 and "wrong token" in await r.text()
        async with http.get(base + "/", headers={"Cookie": "deferrun_web=abc.é"}) as r:
            assert r.status == 200 and "sign in for actions" in await r.text()
        url = f"{base}/api/tasks/{ids['deferred']}/cancel"
        async with http.post(url, headers={"Authorization": "Bearer tokén"}) as r:
            assert r.status == 403
        async with http.post(f"{base}/login", data={"token": TOKEN}, headers=origin) as r:
            assert r.status == 200
        form = f"{base}/tasks/{ids['deferred']}/cancel"
        async with http.post(
            form,
            data="csrf=%C3%A9",
            headers={**origin, "Content-Type": "application/x-www-form-urlencoded"},
        ) as r:
            assert r.status == 403 and "CSRF" in await r.text()
        await get(http, f"{base}/tasks/{ids['deferred']}")


@pytest.mark.parametrize(
    "target",
    [
        "/%09/evil.example",
        "//evil.example",
        "/\\evil.example",
        "https://evil.example/",
        "/%0d%0aSet-Cookie:%20a=b",
        "/\t/evil.example",
        "javascript:alert(1)",
    ],
)
async def test_sign_in_redirects_only_within_this_app(store: Store, target: str) -> None:
    async with serving(store, TOKEN) as base, aiohttp.ClientSession() as http:
        body = f"token={TOKEN}&next={target}"
        async with http.post(
            f"{base}/login",
            data=body,
            headers={"Origin": base, "Content-Type": "application/x-www-form-urlencoded"},
            allow_redirects=False,
        ) as r:
            assert r.status == 303
            assert r.headers["Location"] == "/"
            assert not r.headers["Set-Cookie"].startswith("a=")
        async with http.post(
            f"{base}/login",
            data={"token": TOKEN, "next": "/tasks?state=failed"},
            headers={"Origin": base},
            allow_redirects=False,
        ) as r:
            assert r.headers["Location"] == "/tasks?state=failed"


async def test_the_audit_trail_ignores_x_forwarded_for(store: Store) -> None:
    ids = await every_state(store, running=False)
    async with serving(store, TOKEN) as base, aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {TOKEN}", "X-Forwarded-For": "6.6.6.6"}
        async with http.post(f"{base}/api/tasks/{ids['deferred']}/cancel", headers=headers) as r:
            assert r.status == 200
    lines = [line for _, _, line in await store.task_logs(ids["deferred"])]
    assert any(line.startswith("cancel by 127.0.0.1 at ") for line in lines), lines
    assert not any("6.6.6.6" in line for line in lines)


async def test_log_cursor_out_of_range_is_a_bad_request(store: Store) -> None:
    async with serving(store, None) as base, aiohttp.ClientSession() as http:
        for after in ["99999999999999999999999", "9223372036854775808", "-1", "abc", "٣"]:
            await get(http, f"{base}/api/tasks/x/logs?after={after}", status=400)
        assert await get(http, f"{base}/api/tasks/x/logs?after=9223372036854775807") == []


def test_web_stops_when_its_sqlite_file_is_deleted(tmp_path: Path) -> None:
    """As every other process: a deleted database file stops `deferrun web` with one line and
    exit code 2, instead of serving the unlinked file on."""
    db = tmp_path / "web.db"
    url = f"sqlite:///{db}"

    async def create() -> None:
        created = make_store(url)
        await created.open()
        await created.close()

    anyio.run(create)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "deferrun", "--db", url, "web", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def up() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/overview", timeout=2):
                    return True
            except OSError:
                return False

        wait_until(up, 30, 0.2, "deferrun web listening")
        db.unlink()
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "was deleted" in lines[0] and "Traceback" not in err, err


async def test_refused_credentials_lock_the_address_out(store: Store) -> None:
    ids = await every_state(store, running=False)
    async with serving(store, TOKEN) as base, aiohttp.ClientSession() as http:
        origin = {"Origin": base}
        for _ in range(FAILURES):
            async with http.post(f"{base}/login", data={"token": "guess"}, headers=origin) as r:
                assert r.status == 200 and "wrong token" in await r.text()
        # locked out: even the right token is refused for a while, with 429
        async with http.post(f"{base}/login", data={"token": TOKEN}, headers=origin) as r:
            assert r.status == 429
        url = f"{base}/api/tasks/{ids['deferred']}/cancel"
        async with http.post(url, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 429
    async with serving(store, TOKEN) as base, aiohttp.ClientSession() as http:
        url = f"{base}/api/tasks/{ids['deferred']}/cancel"
        for _ in range(FAILURES):
            async with http.post(url, headers={"Authorization": "Bearer guess"}) as r:
                assert r.status == 403
        async with http.post(url, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 429


async def test_sessions_expire_and_sign_out_ends_them(store: Store) -> None:
    ids = await every_state(store, running=False)
    jar = aiohttp.CookieJar(unsafe=True)
    async with serving(store, TOKEN) as base, aiohttp.ClientSession(cookie_jar=jar) as http:
        origin = {"Origin": base}
        page = f"{base}/tasks/{ids['deferred']}"
        expired = _session_cookie(TOKEN, "a" * 32, int(time.time()) - 1)
        async with http.get(page, headers={"Cookie": f"deferrun_web={expired}"}) as r:
            assert 'name="csrf"' not in await r.text()
        valid = _session_cookie(TOKEN, "a" * 32, int(time.time()) + 60)
        async with http.get(page, headers={"Cookie": f"deferrun_web={valid}"}) as r:
            assert 'name="csrf"' in await r.text()

        async with http.post(f"{base}/login", data={"token": TOKEN}, headers=origin) as r:
            assert r.status == 200
            [cookie] = [c for c in jar if c.key == "deferrun_web"]
            assert 0 < int(cookie["max-age"]) <= 12 * 3600
        assert 'name="csrf"' in await get(http, page)
        async with http.post(f"{base}/logout", headers={"Origin": "http://evil.example"}) as r:
            assert r.status == 403
        async with http.post(f"{base}/logout", headers=origin) as r:
            assert r.status == 200
        assert 'name="csrf"' not in await get(http, page)


async def test_a_task_page_shows_only_its_own_messages(store: Store) -> None:
    ids = await every_state(store, running=False)
    async with serving(store, None) as base, aiohttp.ClientSession() as http:
        page = f"{base}/tasks/{ids['deferred']}"
        spoof = await get(http, page + "?message=Your+account+is+locked,+call+555-0100")
        assert "555-0100" not in spoof
        spoof = await get(http, page + "?done=Your+account+is+locked")
        assert "account" not in spoof and 'id="message"' not in spoof
        assert 'id="message">cancelled<' in await get(http, page + "?done=cancelled")


class Cut:
    """A loopback TCP relay to PostgreSQL that the test can cut, as a server going down does
    (connections reset, new ones refused), and restore on the same port."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.links: list[asyncio.StreamWriter] = []

    async def up(self) -> None:
        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass  # the other side was cut: the relay's whole job
            finally:
                dst.close()

        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
            self.links += [writer, up_writer]
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

        self.server = await asyncio.start_server(relay, "127.0.0.1", self.port)

    async def down(self) -> None:
        assert self.server is not None
        self.server.close()
        for link in self.links:
            link.transport.abort()
        self.links.clear()
        await self.server.wait_closed()


async def test_pages_say_the_database_is_unavailable(pg_url: str) -> None:
    """PostgreSQL going away: pages and JSON are 503 'database unavailable', not a 500, and
    work again once it answers."""
    parts = urlsplit(pg_url)
    cut = Cut(parts.hostname or "127.0.0.1", parts.port or 5432)
    await cut.up()
    store = make_store(pg_url.replace(f":{parts.port}/", f":{cut.port}/", 1))
    await store.open()
    try:
        async with serving(store, None) as base, aiohttp.ClientSession() as http:
            await get(http, base + "/api/tasks")
            await cut.down()
            seen = []
            for path in ["/tasks", "/api/tasks", "/"]:
                async with http.get(base + path) as r:
                    seen.append((r.status, (await r.text())[:90]))
            assert all(st == 503 and "database unavailable" in t for st, t in seen), seen
            await cut.up()

            async def back() -> bool:
                async with http.get(base + "/api/tasks") as r:
                    return r.status == 200

            with anyio.fail_after(30):
                while not await back():
                    await anyio.sleep(0.2)
    finally:
        await store.close()
        if cut.server is not None and cut.server.is_serving():
            await cut.down()
