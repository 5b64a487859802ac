"""SqsTrigger / SqsSensor against the moto server: one shared receive loop per queue, one
message per waiting task, deletion only after the event is stored."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.to_thread
import pytest

from deferrun import Client, TaskState
from deferrun.aws_sensors import SqsSensor, airflow_filter
from deferrun.connections.cache import loop_client_cache
from deferrun.store import Store
from tests.support.processes import Proc, deferrun_env, wait_until
from tests.support.runtime import runtime_for
from tests.support.services import Moto
from triggers import sqs
from triggers.sqs import matches

MODES = ["poke", "reschedule", "deferrable"]


def new_queue(aws: Moto, visibility: int = 30) -> str:
    return aws.boto("sqs").create_queue(
        QueueName=f"q-{uuid.uuid4().hex[:10]}",
        Attributes={"VisibilityTimeout": str(visibility)},
    )["QueueUrl"]


def send(aws: Moto, url: str, bodies: list[Any]) -> list[str]:
    client = aws.boto("sqs")
    ids: list[str] = []
    for start in range(0, len(bodies), 10):
        entries = [
            {"Id": str(i), "MessageBody": json.dumps(b)}
            for i, b in enumerate(bodies[start : start + 10])
        ]
        response = client.send_message_batch(QueueUrl=url, Entries=entries)
        ids.extend(m["MessageId"] for m in response["Successful"])
    return ids


def left_in_queue(aws: Moto, url: str) -> int:
    attrs = aws.boto("sqs").get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(
        attrs["ApproximateNumberOfMessagesNotVisible"]
    )


def test_filters() -> None:
    message = {
        "Body": json.dumps({"order": {"status": "paid"}}),
        "MessageAttributes": {"kind": {"StringValue": "order", "DataType": "String"}},
    }
    assert matches(message, None)
    assert matches(message, {"field": "order.status", "equals": "paid"})
    assert not matches(message, {"field": "order.status", "in": ["refunded"]})
    assert matches(message, {"attribute": "kind", "in": ["order"]})
    assert not matches(message, {"field": "order.missing", "exists": True})
    assert not matches({"Body": "not json"}, {"field": "a", "exists": True})
    assert airflow_filter("jsonpath", ["paid"], "$.order.status") == {
        "field": "order.status",
        "in": ["paid"],
    }
    assert matches({"Body": "hello"}, airflow_filter("literal", ["hello"], None))
    with pytest.raises(ValueError, match="message_filter must be like"):
        sqs.SqsTrigger(queue_url="u", message_filter={"path": "x"})


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_sqs_sensor_takes_only_matching_messages(store: Store, aws: Moto, mode: str) -> None:
    url = new_queue(aws)
    async with runtime_for(store) as rt:
        task_id = await rt.client.submit(
            SqsSensor(
                sqs_queue=url,
                max_messages=1,
                message_filtering="jsonpath",
                message_filtering_config="$.kind",
                message_filtering_match_values=["wanted"],
                mode=mode,
                poke_interval=0.1,
                timeout=30,
            )
        )
        await anyio.to_thread.run_sync(send, aws, url, [{"kind": "other"}])
        await anyio.sleep(0.5)
        assert not (await rt.client.get(task_id)).finished
        (wanted_id,) = await anyio.to_thread.run_sync(send, aws, url, [{"kind": "wanted"}])
        info = await rt.client.wait(task_id, timeout=30)
    assert info.state is TaskState.SUCCESS, info.error
    (message,) = info.result["messages"]
    assert message["MessageId"] == wanted_id and json.loads(message["Body"]) == {"kind": "wanted"}
    # the other message was left for other consumers (made visible again), the wanted one deleted
    left = aws.boto("sqs").receive_message(QueueUrl=url, WaitTimeSeconds=1)["Messages"]
    assert [json.loads(m["Body"]) for m in left] == [{"kind": "other"}]


@pytest.mark.slow
@pytest.mark.anyio
async def test_hundred_tasks_hundred_messages_one_loop(store: Store, aws: Moto) -> None:
    url = new_queue(aws)
    before = dict(sqs.STATS)
    async with runtime_for(store, slots=8) as rt:
        ids = await rt.client.submit_many(
            [
                SqsSensor(sqs_queue=url, max_messages=1, wait_time_seconds=20, mode="deferrable")
                for _ in range(100)
            ]
        )
        with anyio.fail_after(30):
            while (await rt.client.counts()).get("deferred", 0) < 100:
                await anyio.sleep(0.1)
        sent = await anyio.to_thread.run_sync(send, aws, url, [{"n": n} for n in range(100)])
        infos = [await rt.client.wait(tid, timeout=60) for tid in ids]
        with anyio.fail_after(20):
            while await anyio.to_thread.run_sync(left_in_queue, aws, url):
                await anyio.sleep(0.1)
        loops = loop_client_cache().created.get(("sqs-queue", f"aws_default|{url}"))
    assert all(i.state is TaskState.SUCCESS for i in infos), [i.error for i in infos][:3]
    got = [m["MessageId"] for i in infos for m in i.result["messages"]]
    assert all(len(i.result["messages"]) == 1 for i in infos)
    assert sorted(got) == sorted(sent)  # each task one message, each message one task
    assert sqs.STATS["deleted"] - before.get("deleted", 0) == 100
    assert loops == 1  # one receive loop for the queue, shared by the 100 triggers


@pytest.mark.slow
def test_triggerer_killed_before_storing_redelivers_once(
    pg_url: str, moto: Moto, procs: Callable[..., Proc]
) -> None:
    """The event write is held by a table lock; the triggerer is SIGKILLed with the message
    received: it comes back after the visibility timeout and reaches exactly one task."""
    import asyncpg

    url = new_queue(moto, visibility=3)
    env = deferrun_env(pg_url)
    env["DEFERRUN_CONN_AWS_DEFAULT"] = moto.uri()
    procs(["worker"], env)
    first = procs(["triggerer"], env)
    with Client(pg_url) as client:
        ids = [
            client.submit(SqsSensor(sqs_queue=url, max_messages=1, mode="deferrable"))
            for _ in range(2)
        ]
        wait_until(
            lambda: all(client.get(t).state is TaskState.DEFERRED for t in ids), 20, message="defer"
        )
        wait_until(lambda: len(client.triggers()) == 2, 10, message="two triggers")

        async def hold_lock(ready: anyio.Event, release: anyio.Event) -> None:
            conn = await asyncpg.connect(pg_url)
            try:
                async with conn.transaction():
                    await conn.execute("LOCK TABLE deferrun_tasks IN EXCLUSIVE MODE")
                    ready.set()
                    await release.wait()
            finally:
                await conn.close()

        async def scenario() -> None:
            ready, release = anyio.Event(), anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(hold_lock, ready, release)
                await ready.wait()
                await anyio.to_thread.run_sync(send, moto, url, [{"only": 1}])

                def in_flight() -> bool:
                    attrs = moto.boto("sqs").get_queue_attributes(
                        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessagesNotVisible"]
                    )["Attributes"]
                    return attrs["ApproximateNumberOfMessagesNotVisible"] == "1"

                await anyio.to_thread.run_sync(
                    lambda: wait_until(in_flight, 20, message="the message to be received")
                )
                await anyio.sleep(0.5)  # the event write is now waiting on the lock
                first.kill()
                first.popen.wait(10)
                release.set()

        anyio.run(scenario)
        procs(["triggerer"], env)
        done = wait_until(
            lambda: [t for t in ids if client.get(t).state is TaskState.SUCCESS],
            40,
            message="the message to be delivered again",
        )
        wait_until(lambda: left_in_queue(moto, url) == 0, 20, message="the message deleted")
        assert len(done) == 1
        other = next(t for t in ids if t not in done)
        assert client.get(other).state is TaskState.DEFERRED  # never got a copy
        (message,) = client.get(done[0]).result["messages"]
    assert json.loads(message["Body"]) == {"only": 1}
    assert message["Attributes"]["ApproximateReceiveCount"] == "2"  # received, lost, received


@pytest.mark.anyio
async def test_message_released_at_once_when_a_failure_is_stored(store: Store, aws: Moto) -> None:
    """An event too large to store becomes the task's failure; its message is offered again
    at once (not after the 30 s visibility timeout) and not deleted."""
    url = new_queue(aws, visibility=30)
    async with runtime_for(store, max_event_bytes=2000) as rt:
        task_id = await rt.client.submit(
            SqsSensor(sqs_queue=url, max_messages=1, mode="deferrable", timeout=30)
        )
        await anyio.to_thread.run_sync(send, aws, url, ["x" * 5000])
        info = await rt.client.wait(task_id, timeout=30)
        assert info.state is TaskState.FAILED and "bytes" in (info.error or ""), info.error

    def visible() -> bool:
        return bool(aws.boto("sqs").receive_message(QueueUrl=url).get("Messages"))

    await anyio.to_thread.run_sync(lambda: wait_until(visible, 10, message="the message back"))


@pytest.mark.parametrize(
    "bad",
    [
        {"field": "kind", "in": 5},
        {"field": "kind", "in": {"x": 1}},
        {"attribute": ["kind"], "exists": True},
        {"field": 5, "exists": False},
        {"field": "", "exists": True},
        {"field": "a", "attribute": "b"},
        {"field": "a", "exists": "no"},
    ],
)
def test_malformed_filters_are_refused_at_construction(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="message_filter"):
        sqs.SqsTrigger(queue_url="u", message_filter=bad)


@pytest.mark.anyio
async def test_a_filter_that_raises_fails_only_its_own_waiter() -> None:
    """A filter that raises (one that slipped past validation) must not fail the other tasks
    waiting on the queue: its waiter alone gets the error, the message goes to the next."""
    loop = sqs.QueueLoop("aws_default", "http://127.0.0.1:1/q")
    loop._receiver = loop._janitor = None
    bad = sqs._Waiter({"field": "kind", "in": 5}, 1, 1)  # bypasses validate_filter
    good = sqs._Waiter(None, 1, 1)
    loop.waiters = [bad, good]
    message = {"MessageId": "m1", "ReceiptHandle": "h1", "Body": json.dumps({"kind": "x"})}
    loop._hand_out([message])
    assert good.future.result() == [message]
    with pytest.raises(ValueError, match="failed on a message"):
        bad.future.result()
    assert loop.waiters == [] and loop._to_release == []


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_message_outliving_its_visibility_goes_to_one_task_only(
    store: Store, db_url: str, aws: Moto
) -> None:
    """VisibilityTimeout=1 s and an event write held up by a database write lock: the long
    poll must not receive the message again and hand it to the second waiting task (held
    messages are kept invisible and never handed out twice)."""
    url = new_queue(aws, visibility=1)
    async with runtime_for(store, reconcile_interval=0.2) as rt:
        ids = [
            await rt.client.submit(
                SqsSensor(sqs_queue=url, mode="deferrable", wait_time_seconds=1, timeout=60)
            )
            for _ in range(2)
        ]
        with anyio.fail_after(20):
            while len(await rt.client.triggers()) < 2 or [
                t for t in ids if (await rt.client.get(t)).state is not TaskState.DEFERRED
            ]:
                await anyio.sleep(0.05)
            while sqs.STATS["receive_calls"] == 0:
                await anyio.sleep(0.05)
        delivered = sqs.STATS["delivered"]
        async with hold_write_lock(db_url):
            await anyio.to_thread.run_sync(send, aws, url, [{"only": 1}])
            with anyio.fail_after(20):
                while sqs.STATS["delivered"] == delivered:
                    await anyio.sleep(0.05)
                calls = sqs.STATS["receive_calls"]
                # three more 1 s long polls: the message's 1 s visibility ran out meanwhile
                while sqs.STATS["receive_calls"] < calls + 3:
                    await anyio.sleep(0.05)
        with anyio.fail_after(30):
            while not [t for t in ids if (await rt.client.get(t)).state is TaskState.SUCCESS]:
                await anyio.sleep(0.1)
            while await anyio.to_thread.run_sync(left_in_queue, aws, url):
                await anyio.sleep(0.2)
            calls = sqs.STATS["receive_calls"]
            while sqs.STATS["receive_calls"] < calls + 2:
                await anyio.sleep(0.05)
        states = sorted([(await rt.client.get(t)).state.value for t in ids])
    assert states == ["deferred", "success"], states
    assert sqs.STATS["delivered"] == delivered + 1


@contextlib.asynccontextmanager
async def hold_write_lock(db_url: str) -> AsyncIterator[None]:
    """Block every write to the deferrun database while inside."""
    if db_url.startswith("sqlite"):
        import sqlite3

        conn = sqlite3.connect(db_url.split("sqlite:///", 1)[1], timeout=10, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            conn.execute("COMMIT")
            conn.close()
        return
    import asyncpg

    pg = await asyncpg.connect(db_url)
    try:
        async with pg.transaction():
            await pg.execute("LOCK TABLE deferrun_tasks IN EXCLUSIVE MODE")
            yield
    finally:
        await pg.close()
