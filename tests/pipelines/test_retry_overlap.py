"""Two retries of one task at once: one retry, one clear refusal (issue 24, bug 4).

Each round ends the task, then starts two retries together; exactly one puts the task back
and the other is refused with one line saying it was already retried, from the client (both
backends), the CLI and the status page's API.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web

from deferrun.client import AsyncClient, Client, build_task
from deferrun.core.models import TaskState
from deferrun.exceptions import DeferrunError, RetryRefused
from deferrun.store import Store
from deferrun.web.app import build_app
from tests.support.pipeline_userland import Step
from tests.support.processes import REPO, deferrun_env
from tests.support.userland import NeverTrigger

pytestmark = pytest.mark.anyio
ROUNDS = 8
TOKEN = "retry-overlap-token"


async def _end(store: Store, task_id: str) -> None:
    """Run the task to success however it waits: claim it, or end it from its trigger."""
    info = await store.get_task(task_id)
    assert info is not None
    if info.state is TaskState.DEFERRED:
        [trigger] = [t for t in await store.list_triggers() if t.task_id == task_id]
        assert await store.end_triggers([(trigger.id, "success", '"ok"', None)]) == 1
        return
    [claim] = await store.claim_tasks("w1", ["default"], 1)
    assert claim.id == task_id
    assert await store.complete_task(task_id, claim.claim_token, '"ok"')


async def _both(call: Callable[[], Awaitable[Any]]) -> list[Any]:
    """Start ``call`` twice together; what each returned or raised."""
    out: list[Any] = []

    async def one() -> None:
        try:
            out.append(await call())
        except Exception as exc:  # what the caller sees is the result here
            out.append(exc)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(one)
            tg.start_soon(one)
    return out


def _check_refusal(text: str) -> None:
    assert "already retried" in text and "\n" not in text.strip(), text


@pytest.mark.parametrize("kind", ["plain", "started", "waiter"])
async def test_client_retries_at_once_give_one_retry_and_one_refusal(
    store: Store, kind: str
) -> None:
    up = build_task(Step())
    await store.submit(up)
    await _end(store, up.id)
    if kind == "plain":
        task = build_task(Step())
    elif kind == "started":
        task = build_task(Step(), start_trigger=NeverTrigger())
    else:
        task = build_task(Step(), after=[up.id])
    await store.submit(task)
    client = AsyncClient(store=store)
    for round_ in range(ROUNDS):
        await _end(store, task.id)
        results = await _both(lambda: client.retry(task.id))
        done = [r for r in results if r == [task.id]]
        refused = [r for r in results if isinstance(r, RetryRefused)]
        assert len(done) == 1 and len(refused) == 1, (round_, results)
        _check_refusal(str(refused[0]))
        info = await store.get_task(task.id)
        assert info is not None and not info.finished
        if kind == "started":
            assert len([t for t in await store.list_triggers() if t.task_id == task.id]) == 1


async def test_sync_client_retries_at_once(store: Store, db_url: str) -> None:
    """``Client.retry`` from two threads at once: the same one retry and one refusal."""
    task = build_task(Step(), start_trigger=NeverTrigger())
    await store.submit(task)
    client = Client(db_url)
    try:
        for round_ in range(3):
            await _end(store, task.id)
            results = await _both(lambda: anyio.to_thread.run_sync(client.retry, task.id))
            assert sorted(type(r).__name__ for r in results) == ["RetryRefused", "list"], (
                round_,
                results,
            )
    finally:
        client.close()


async def test_cli_retries_at_once_give_one_retry_and_one_refusal(pg_url: str) -> None:
    from deferrun.store import make_store

    store = make_store(pg_url)
    await store.open()
    try:
        task = build_task(Step(), start_trigger=NeverTrigger())
        await store.submit(task)
        env = deferrun_env(pg_url)
        command = [sys.executable, "-m", "deferrun", "retry", task.id]
        for round_ in range(3):
            await _end(store, task.id)
            runs = await _both(lambda: anyio.run_process(command, env=env, cwd=REPO, check=False))
            codes = sorted(r.returncode for r in runs)
            assert codes[0] == 0 and codes[1] != 0, (round_, [r.stderr for r in runs])
            [refused] = [r for r in runs if r.returncode != 0]
            err = refused.stderr.decode()
            _check_refusal(err)
            assert "Traceback" not in err
    finally:
        await store.close()


async def test_http_retries_at_once_give_one_retry_and_one_409(store: Store) -> None:
    task = build_task(Step(), start_trigger=NeverTrigger())
    await store.submit(task)
    runner = web.AppRunner(build_app(store, TOKEN), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    url = f"http://{host}:{port}/api/tasks/{task.id}/retry"
    try:
        async with aiohttp.ClientSession() as http:

            async def post() -> tuple[int, Any]:
                auth = {"Authorization": f"Bearer {TOKEN}"}
                async with http.post(url, headers=auth) as r:
                    return r.status, await r.json()

            for round_ in range(ROUNDS):
                await _end(store, task.id)
                answers = sorted(await _both(post), key=lambda a: a[0])
                assert [a[0] for a in answers] == [200, 409], (round_, answers)
                assert answers[0][1]["task_ids"] == [task.id]
                _check_refusal(answers[1][1]["error"])
    finally:
        await runner.cleanup()


def test_refusal_is_a_deferrun_error() -> None:
    assert issubclass(RetryRefused, DeferrunError) and issubclass(RetryRefused, ValueError)
