"""The shared backend suite: every store implements the same state machine."""

from __future__ import annotations

import time

import anyio
import pytest

from deferrun.client import build_task
from deferrun.core import serialization
from deferrun.core.baseoperator import BaseOperator
from deferrun.core.models import Deferral, TaskState
from deferrun.store import Store
from tests.support.userland import DeferOnce, Flaky

pytestmark = pytest.mark.anyio


def deferral(timeout: float | None = None) -> Deferral:
    return Deferral(
        classpath="tests.support.userland.EchoTrigger",
        kwargs='{"value": 1}',
        method_name="resume",
        method_kwargs='{"k": 2}',
        timeout=timeout,
    )


async def submit(store: Store, op: BaseOperator | None = None) -> str:
    task = build_task(op or DeferOnce(value=1))
    await store.submit(task)
    return task.id


async def register(store: Store, pid: str, role: str = "worker") -> None:
    await store.register_process(pid, role, ["default"] if role == "worker" else [], 4)  # type: ignore[arg-type]


async def test_full_cycle_submit_defer_fire_resume(store: Store) -> None:
    await register(store, "w1")
    await register(store, "t1", "triggerer")
    task_id = await submit(store)
    [claimed] = await store.claim_tasks("w1", ["default"], 10)
    assert claimed.id == task_id and claimed.try_number == 1 and claimed.next_method is None
    assert await store.claim_tasks("w1", ["default"], 10) == []

    trigger_id = await store.defer_task(task_id, claimed.claim_token, deferral())
    assert trigger_id is not None
    info = await store.get_task(task_id)
    assert info is not None and info.state is TaskState.DEFERRED
    assert (
        info.trigger_id == trigger_id
        and info.trigger_classpath == "tests.support.userland.EchoTrigger"
    )

    [trig] = await store.claim_triggers("t1", [], 10)
    assert trig.id == trigger_id and trig.task_id == task_id
    assert await store.claim_triggers("t1", [], 10) == []
    assert await store.owned_trigger_ids("t1") == {trigger_id}

    # Two events for the same trigger (e.g. after a failover): only the first counts.
    assert await store.fire_triggers([(trigger_id, serialization.dumps("first"))]) == 1
    assert await store.fire_triggers([(trigger_id, serialization.dumps("second"))]) == 0
    assert await store.owned_trigger_ids("t1") == set()

    [resumed] = await store.claim_tasks("w1", ["default"], 10)
    assert resumed.next_method == "resume" and serialization.loads(resumed.event) == "first"
    assert serialization.loads(resumed.next_kwargs) == {"k": 2}
    assert resumed.try_number == 1  # a resume is not a new try
    assert resumed.claim_token > claimed.claim_token
    assert not await store.complete_task(task_id, claimed.claim_token, None)  # stale claim
    assert await store.complete_task(
        task_id, resumed.claim_token, serialization.dumps({"ok": True})
    )
    info = await store.get_task(task_id)
    assert info is not None and info.state is TaskState.SUCCESS and info.result == {"ok": True}
    assert info.finished_at is not None


async def test_stale_worker_cannot_overwrite(store: Store) -> None:
    task_id = await submit(store)
    [claim] = await store.claim_tasks("w1", ["default"], 1)
    stale = claim.claim_token - 1
    assert not await store.complete_task(task_id, stale, None)
    assert await store.defer_task(task_id, stale, deferral()) is None
    assert await store.fail_task(task_id, stale, "x", retry=True) is None
    assert not await store.skip_task(task_id, stale, None)
    assert not await store.reschedule_task(task_id, stale, 0)
    assert not await store.requeue_task(task_id, stale)
    assert (await store.get_task(task_id)).state is TaskState.RUNNING  # type: ignore[union-attr]


async def test_retry_waits_for_retry_delay_then_counts_a_new_try(store: Store) -> None:
    task_id = await submit(store, Flaky(retries=1, retry_delay=0.3))
    [claim] = await store.claim_tasks("w1", ["default"], 1)
    assert await store.fail_task(task_id, claim.claim_token, "err", retry=True) is (
        TaskState.UP_FOR_RETRY
    )
    info = await store.get_task(task_id)
    assert info is not None and info.state is TaskState.UP_FOR_RETRY and info.not_before
    assert await store.claim_tasks("w1", ["default"], 1) == []
    due = await store.next_due(["default"])
    assert due is not None and due > time.time()
    await anyio.sleep(due - time.time() + 0.05)
    [again] = await store.claim_tasks("w1", ["default"], 1)
    assert again.try_number == 2
    assert await store.fail_task(task_id, again.claim_token, "err2", retry=True) is (
        TaskState.FAILED
    )
    info = await store.get_task(task_id)
    assert info is not None and info.error == "err2" and info.finished


async def test_reschedule_keeps_try_number_and_try_start(store: Store) -> None:
    task_id = await submit(store)
    [first] = await store.claim_tasks("w1", ["default"], 1)
    assert await store.reschedule_task(task_id, first.claim_token, 0.2)
    assert (await store.get_task(task_id)).state is TaskState.UP_FOR_RESCHEDULE  # type: ignore[union-attr]
    await anyio.sleep(0.3)
    [second] = await store.claim_tasks("w1", ["default"], 1)
    assert second.try_number == first.try_number == 1
    assert second.try_started_at == first.try_started_at


async def test_dead_worker_tasks_are_retried_or_failed(store: Store) -> None:
    await register(store, "w-dead")
    retry_id = await submit(store, Flaky(retries=1, retry_delay=0))
    fail_id = await submit(store, Flaky(retries=0))
    assert len(await store.claim_tasks("w-dead", ["default"], 2)) == 2
    report = await store.reap(dead_after=60)
    assert not report.retried and not report.failed  # still alive
    await anyio.sleep(0.3)
    report = await store.reap(dead_after=0.2)
    assert report.retried == [retry_id] and report.failed == [fail_id]
    assert "w-dead" in report.dead_processes
    info = await store.get_task(fail_id)
    assert info is not None and info.state is TaskState.FAILED
    assert "stopped heartbeating" in (info.error or "")


async def test_dead_triggerer_triggers_are_released(store: Store) -> None:
    await register(store, "t-dead", "triggerer")
    task_id = await submit(store)
    [claim] = await store.claim_tasks("w1", ["default"], 1)
    trigger_id = await store.defer_task(task_id, claim.claim_token, deferral())
    assert [t.id for t in await store.claim_triggers("t-dead", [], 5)] == [trigger_id]
    await anyio.sleep(0.3)
    report = await store.reap(dead_after=0.2)
    assert report.released_triggers == 1
    assert [t.id for t in await store.claim_triggers("t-live", [], 5)] == [trigger_id]


async def test_deferral_deadline_resumes_into_timeout(store: Store) -> None:
    task_id = await submit(store)
    [claim] = await store.claim_tasks("w1", ["default"], 1)
    await store.defer_task(task_id, claim.claim_token, deferral(timeout=0.1))
    await anyio.sleep(0.2)
    report = await store.reap(dead_after=60)
    assert report.timed_out == [task_id]
    [resumed] = await store.claim_tasks("w1", ["default"], 1)
    assert resumed.next_method == BaseOperator.DEFERRAL_TIMEOUT_METHOD
    assert "deferral timed out" in serialization.loads(resumed.event)["error"]
    assert await store.list_triggers() == []


async def test_cancel_removes_trigger(store: Store) -> None:
    task_id = await submit(store)
    [claim] = await store.claim_tasks("w1", ["default"], 1)
    trigger_id = await store.defer_task(task_id, claim.claim_token, deferral())
    info = await store.cancel_task(task_id)
    assert info is not None and info.state is TaskState.CANCELLED
    assert await store.list_triggers() == []
    assert await store.fire_triggers([(trigger_id or 0, "1")]) == 0
    assert (await store.get_task(task_id)).state is TaskState.CANCELLED  # type: ignore[union-attr]


async def test_trigger_failure_resumes_into_failure_method(store: Store) -> None:
    task_id = await submit(store)
    [claim] = await store.claim_tasks("w1", ["default"], 1)
    trigger_id = await store.defer_task(task_id, claim.claim_token, deferral())
    assert trigger_id is not None
    event = serialization.dumps({"error": "trigger raised"})
    assert await store.fail_triggers([(trigger_id, BaseOperator.TRIGGER_FAILED_METHOD, event)]) == 1
    [resumed] = await store.claim_tasks("w1", ["default"], 1)
    assert resumed.next_method == BaseOperator.TRIGGER_FAILED_METHOD
    assert resumed.next_kwargs is None


async def test_queues_are_respected(store: Store) -> None:
    await submit(store, DeferOnce(queue="gpu"))
    assert await store.claim_tasks("w1", ["default"], 5) == []
    assert len(await store.claim_tasks("w1", ["gpu"], 5)) == 1


async def test_graceful_deregister_requeues_and_releases(store: Store) -> None:
    await register(store, "w1")
    await register(store, "t1", "triggerer")
    running = await submit(store)
    deferred = await submit(store)
    claims = {c.id: c for c in await store.claim_tasks("w1", ["default"], 2)}
    trigger_id = await store.defer_task(deferred, claims[deferred].claim_token, deferral())
    await store.claim_triggers("t1", [], 5)
    await store.deregister_process("w1")
    await store.deregister_process("t1")
    assert (await store.get_task(running)).state is TaskState.QUEUED  # type: ignore[union-attr]
    assert [t.id for t in await store.claim_triggers("t2", [], 5)] == [trigger_id]
    assert [p.id for p in await store.list_processes()] == []


async def test_claims_are_exclusive_under_concurrency(store: Store) -> None:
    ids = {await submit(store) for _ in range(60)}
    claimed: list[str] = []

    async def claimer(name: str) -> None:
        for _ in range(40):
            got = await store.claim_tasks(name, ["default"], 3)
            claimed.extend(t.id for t in got)
            if not got:
                return

    async with anyio.create_task_group() as tg:
        for n in range(4):
            tg.start_soon(claimer, f"w{n}")
    assert sorted(claimed) == sorted(ids)


async def test_task_logs_are_ordered_and_bounded(store: Store) -> None:
    rows = [("t1", 100.0 + i, "worker", f'{{"n": {i}}}') for i in range(30)]
    rows.append(("t2", 50.0, "trigger", '{"other": true}'))
    await store.append_task_logs(rows[:15], keep=20)
    await store.append_task_logs(rows[15:], keep=20)
    kept = await store.task_logs("t1")
    assert [line for _, _, line in kept] == [f'{{"n": {i}}}' for i in range(10, 30)]
    assert await store.task_logs("t2") == [(50.0, "trigger", '{"other": true}')]
    # Lines from two processes come back in the order they were logged, not flushed.
    await store.append_task_logs([("t3", 2.0, "worker", "b")], keep=10)
    await store.append_task_logs([("t3", 1.0, "trigger", "a")], keep=10)
    assert [line for _, _, line in await store.task_logs("t3")] == ["a", "b"]


async def test_schema_v1_database_is_migrated(db_url: str) -> None:
    """A database written by schema version 1 gains the task log table on open."""
    from deferrun.store import open_store

    store = await open_store(db_url)
    task_id = await submit(store)
    await _downgrade_to_v1(store)
    await store.close()
    store = await open_store(db_url)
    try:
        await store.append_task_logs([(task_id, 1.0, "worker", "x")], keep=5)
        assert len(await store.task_logs(task_id)) == 1
        assert (await store.get_task(task_id)) is not None  # data kept
        from deferrun.store.schema import SCHEMA_VERSION

        assert await _schema_version(store) == SCHEMA_VERSION
        assert await store.load_xcoms(task_id) == {}  # the v6 xcom table exists again
        await store.register_process("p1", "worker", ["default"], 1)
        await store.heartbeat("p1")  # writes loop_lag, a version 7 column
        assert [p["id"] for p in await store.process_load()] == ["p1"]
    finally:
        await store.close()


async def _downgrade_to_v1(store: Store) -> None:
    from deferrun.store.postgres.connector import PostgresStore
    from deferrun.store.sqlite.connector import SQLiteStore

    if isinstance(store, SQLiteStore):
        # Version 1 had no logs table, no claim tokens and no deferrun_ prefix on SQLite.
        conn = store.connector.conn
        conn.execute("DROP TABLE deferrun_task_logs")
        conn.execute("DROP TABLE deferrun_xcom")
        for table in ("tasks", "triggers", "processes"):
            conn.execute(f"ALTER TABLE deferrun_{table} RENAME TO {table}")
        conn.execute("ALTER TABLE tasks DROP COLUMN claim_token")
        conn.execute("DROP TABLE deferrun_deps")
        conn.execute("DROP INDEX deferrun_triggers_watch")
        conn.execute("DROP INDEX deferrun_triggers_affinity")
        for column in ("affinity", "poll_key"):
            conn.execute(f"ALTER TABLE triggers DROP COLUMN {column}")
        for column in ("trigger_rule", "has_downstream", "retries"):
            conn.execute(f"ALTER TABLE tasks DROP COLUMN {column}")
        conn.execute("ALTER TABLE triggers DROP COLUMN watch_task_id")
        conn.execute("ALTER TABLE processes DROP COLUMN loop_lag")
        conn.execute("PRAGMA user_version = 1")
    else:
        assert isinstance(store, PostgresStore)
        pool = store.connector.pool
        await pool.execute("DROP TABLE deferrun_task_logs")
        await pool.execute("DROP TABLE deferrun_xcom")
        await pool.execute("ALTER TABLE deferrun_tasks DROP COLUMN claim_token")
        await pool.execute("ALTER TABLE deferrun_processes DROP COLUMN wake_port")
        await pool.execute("DROP TABLE deferrun_deps")
        for column in ("trigger_rule", "has_downstream", "retries"):
            await pool.execute(f"ALTER TABLE deferrun_tasks DROP COLUMN {column}")
        await pool.execute("ALTER TABLE deferrun_triggers DROP COLUMN watch_task_id")
        for column in ("affinity", "poll_key"):  # version 5
            await pool.execute(f"ALTER TABLE deferrun_triggers DROP COLUMN {column}")
        await pool.execute("ALTER TABLE deferrun_processes DROP COLUMN loop_lag")
        await pool.execute("DELETE FROM deferrun_schema")
        await pool.execute("INSERT INTO deferrun_schema VALUES (1)")


async def _schema_version(store: Store) -> int:
    from deferrun.store.postgres.connector import PostgresStore
    from deferrun.store.sqlite.connector import SQLiteStore

    if isinstance(store, SQLiteStore):
        return int(store.connector.conn.execute("PRAGMA user_version").fetchone()[0])
    assert isinstance(store, PostgresStore)
    return int(await store.connector.pool.fetchval("SELECT max(version) FROM deferrun_schema"))
