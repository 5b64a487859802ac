"""Shared polls against real servers on loopback: one request answers many triggers."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.to_thread
import pytest

from deferrun import TriggerEvent
from deferrun.connections.cache import close_loop_clients
from deferrun.connections.clients import aws_client
from deferrun.core.models import ClaimedTrigger
from deferrun.core.serialization import dumps, loads
from deferrun.triggerer.trigger_run import Limits, run_to_first_event
from tests.support import shared_userland
from tests.support.runtime import wait_for
from tests.support.services import FakeServices, Moto
from tests.support.shared_userland import FeedTrigger
from triggers import s3_shared
from triggers.http import HttpTrigger
from triggers.job import JobStatusTrigger
from triggers.s3 import S3KeyTrigger

pytestmark = pytest.mark.anyio


@pytest.fixture
async def api(services: FakeServices, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    monkeypatch.setenv("DEFERRUN_CONN_HTTP_DEFAULT", services.uri())
    yield services
    await close_loop_clients()


@pytest.fixture
def feed() -> Iterator[str]:
    shared_userland.BATCHES.clear()
    shared_userland.ARRIVED.clear()
    yield f"feed-{uuid.uuid4().hex[:8]}"


async def run_one(trigger: Any, trigger_id: int = 1, timeout: float = 20.0) -> Any:
    """``trigger`` to its first event as the triggerer runs it (arun_trigger would close the
    shared clients under the other triggers of the test): the event, or what it raised."""
    classpath, kwargs = trigger.serialize()
    row = ClaimedTrigger(trigger_id, f"task-{trigger_id}", classpath, dumps(kwargs), timeout)
    outcome = await run_to_first_event(row, Limits())
    if outcome.fired:
        return TriggerEvent(loads(outcome.payload))
    return outcome.exc or RuntimeError(outcome.error)


async def run_all(triggers: list[Any], timeout: float = 20.0) -> list[Any]:
    """Run every trigger at once (as the triggerer would); each one's event or exception."""
    results: list[Any] = [None] * len(triggers)

    async def one(i: int) -> None:
        results[i] = await run_one(triggers[i], i + 1, timeout)

    async with anyio.create_task_group() as tg:
        for i in range(len(triggers)):
            tg.start_soon(one, i)
    return results


async def test_identical_requests_share_one_request_with_checks_per_trigger(api: Any) -> None:
    name = f"ready-{uuid.uuid4().hex[:8]}"
    path = f"/health/{name}"
    checks = [None, {"field": "state", "equals": "green"}, {"field": "state", "exists": True}]
    triggers = [
        HttpTrigger(endpoint=f"health/{name}", poll_interval=0.2, response_check=checks[i % 3])
        for i in range(30)
    ]

    async def ready_later() -> None:
        await wait_for(lambda: api.requests[path] >= 3)
        api.ready[name] = {"state": "green"}

    async with anyio.create_task_group() as tg:
        tg.start_soon(ready_later)
        results = await run_all(triggers)
    assert all(isinstance(r, TriggerEvent) for r in results), results
    assert {r.payload["body"]["state"] for r in results} == {"green"}
    # one request per interval for all 30 (each polling alone: 30 per interval)
    assert api.requests[path] <= 5, api.requests[path]


async def test_permanent_error_fails_every_member_with_the_same_error(api: Any) -> None:
    before = api.requests["/bad-request"]
    triggers = [HttpTrigger(endpoint="bad-request", poll_interval=0.1 + i / 100) for i in range(8)]
    results = await run_all(triggers)
    assert all(isinstance(r, RuntimeError) for r in results), results
    assert len({str(r) for r in results}) == 1
    assert "HTTP 400" in str(results[0]) and "missing parameter" in str(results[0])
    assert api.requests["/bad-request"] - before == 1


async def test_transient_error_backs_off_once_for_all(api: Any) -> None:
    name = f"flaky-{uuid.uuid4().hex[:8]}"
    api.flaky_failures[name] = 2
    checks = [None, {"field": "ok", "equals": True}]
    triggers = [
        HttpTrigger(
            endpoint=f"flaky/{name}", poll_interval=0.05 + i / 1000, response_check=checks[i % 2]
        )
        for i in range(10)
    ]
    for t in triggers:
        t.max_backoff = 0.3
    results = await run_all(triggers)
    assert all(isinstance(r, TriggerEvent) for r in results), results
    # two 503s, one success: three requests in all, not three per trigger
    assert api.requests[f"/flaky/{name}"] == 3


async def test_members_with_different_intervals_poll_at_the_smallest(feed: str) -> None:
    slow = FeedTrigger(feed=feed, name="slow", poll_interval=5.0)
    fast = FeedTrigger(feed=feed, name="fast", poll_interval=0.1)
    started = anyio.current_time()

    async def arrive() -> None:
        await wait_for(lambda: len(shared_userland.BATCHES) >= 6)
        shared_userland.ARRIVED.update({"slow", "fast"})

    async with anyio.create_task_group() as tg:
        tg.start_soon(arrive)
        results = await run_all([slow, fast])
    assert [r.payload for r in results] == ["slow", "fast"]
    assert anyio.current_time() - started < 3.0  # not the slow member's 5 s
    assert all(names == ["fast", "slow"] for _, names in shared_userland.BATCHES[1:])


@pytest.mark.slow
async def test_a_member_joining_a_poll_in_flight_is_answered_by_the_next(api: Any) -> None:
    """The first poll (1 s in flight) was sent before the second trigger joined."""
    before = api.requests["/slow"]
    first = HttpTrigger(endpoint="slow?seconds=1", poll_interval=0.1)
    second = HttpTrigger(
        endpoint="slow?seconds=1",
        poll_interval=0.1,
        response_check={"field": "slow", "equals": True},
    )
    done: dict[str, float] = {}

    async def run(name: str, trigger: HttpTrigger, delay: float) -> None:
        await anyio.sleep(delay)
        assert isinstance(await run_one(trigger), TriggerEvent)
        done[name] = anyio.current_time()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "first", first, 0)
        await wait_for(lambda: api.requests["/slow"] > before)
        tg.start_soon(run, "second", second, 0.2)
    assert api.requests["/slow"] - before == 2
    assert done["second"] - done["first"] >= 0.5  # answered by the next poll, not the first


async def test_job_status_triggers_on_one_run_share_its_status_request(api: Any) -> None:
    import json
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{api.port}/api/runs",
        data=json.dumps({"polls": 4}).encode(),
        headers={"Content-Type": "application/json", "Authorization": _basic()},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        run_id = json.loads(resp.read())["data"]["id"]
    triggers = [
        JobStatusTrigger(
            status_endpoint=f"api/runs/{run_id}",
            http_conn_id="http_default",
            status_field="state.life_cycle",
            success_states=["SUCCESS", f"NEVER-{i}"],
            poll_interval=0.1,
        )
        for i in range(20)
    ]
    results = await run_all(triggers)
    assert [r.payload["status"] for r in results] == ["success"] * 20
    assert api.runs[run_id].polls == 5  # the run's own count: one request per interval


def _basic() -> str:
    import base64

    from tests.support.services import PASSWORD, USER

    return "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


async def _count_s3_requests() -> dict[str, int]:
    counts: dict[str, int] = {}
    client = await aws_client("s3", "aws_default")

    def count(event_name: str, **_: Any) -> None:
        op = event_name.rsplit(".", 1)[-1]
        counts[op] = counts.get(op, 0) + 1

    client.meta.events.register("before-send.s3", count)
    return counts


async def test_s3_keys_under_one_prefix_share_one_listing(aws: Moto, bucket: str) -> None:
    keys = [f"day=1/part-{i:03}" for i in range(40)]
    triggers = [S3KeyTrigger(bucket, k, poll_interval=0.2) for k in keys]
    counts = await _count_s3_requests()
    s3 = aws.boto("s3")

    async def land() -> None:
        await wait_for(lambda: counts.get("ListObjectsV2", 0) >= 2)
        for k in keys:
            await anyio.to_thread.run_sync(lambda k=k: s3.put_object(Bucket=bucket, Key=k))

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(land)
        results = await run_all(triggers)
    intervals = (time.monotonic() - started) / 0.2
    assert [r.payload["keys"] for r in results] == [[k] for k in keys]
    assert counts.get("HeadObject", 0) == 0
    # one listing per interval (however slow the machine makes the landing), where polling
    # alone costs 40 HEADs per interval
    assert counts["ListObjectsV2"] <= intervals / 0.9 + 2, (counts, intervals)
    assert s3_shared.LAST_MODE[("aws_default", bucket, "day=1/")] == "list"


async def test_s3_heads_keys_when_the_listing_costs_more(
    aws: Moto, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3 pages of 2 objects to find 2 keys: HEAD the 2 keys instead of listing."""
    monkeypatch.setattr(s3_shared, "PAGE_SIZE", 2)
    s3 = aws.boto("s3")
    for i in range(6):
        s3.put_object(Bucket=bucket, Key=f"big/other-{i}", Body=b"x")
    wanted = ["big/want-a", "big/want-b"]
    counts = await _count_s3_requests()

    async def land() -> None:
        await wait_for(lambda: counts.get("HeadObject", 0) >= 4)
        for k in wanted:
            await anyio.to_thread.run_sync(lambda k=k: s3.put_object(Bucket=bucket, Key=k))

    async with anyio.create_task_group() as tg:
        tg.start_soon(land)
        results = await run_all([S3KeyTrigger(bucket, k, poll_interval=0.1) for k in wanted])
    assert [r.payload["keys"] for r in results] == [[k] for k in wanted]
    assert s3_shared.LAST_MODE[("aws_default", bucket, "big/")] == "head"
    # the listing was tried once and abandoned after the page that exceeded the key count
    assert counts["ListObjectsV2"] <= 3, counts
