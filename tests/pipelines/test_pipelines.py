"""Pipelines on both backends: tasks that wait on tasks, start from a trigger, pass results,
end from a trigger, watch other tasks, and re-run with everything after them."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from deferrun import TaskState
from deferrun.exceptions import TaskNotFound
from deferrun.sensors import TaskSensor
from deferrun.store import Store
from tests.support.pipeline_userland import Ends, Step
from tests.support.runtime import runtime_for
from tests.support.userland import EchoTrigger, NeverTrigger

pytestmark = pytest.mark.anyio


async def test_chain_passes_results_and_waits_without_a_slot(store: Store) -> None:
    async with runtime_for(store, slots=1) as rt:
        c = rt.client
        a = await c.submit(Step(task_id="start", value=1))
        b = await c.submit(Step(task_id="wait", value=2), after=[a])
        d = await c.submit(Step(task_id="fetch", value=3), after=[b])
        info = await c.wait(d, timeout=20)
        b_info = await c.get(b)
    assert info.state is TaskState.SUCCESS, info.error
    assert info.result["upstream"] == {b: b_info.result}
    assert b_info.result["upstream"][a]["value"] == 1


# rule -> upstream outcomes -> expected downstream state
RULES = [
    ("all_success", ["success", "success"], TaskState.SUCCESS),
    ("all_success", ["success", "failed"], TaskState.UPSTREAM_FAILED),
    ("all_success", ["success", "skipped"], TaskState.SKIPPED),
    ("all_failed", ["failed", "failed"], TaskState.SUCCESS),
    ("all_failed", ["failed", "success"], TaskState.SKIPPED),
    ("all_done", ["failed", "skipped"], TaskState.SUCCESS),
    ("one_success", ["failed", "success"], TaskState.SUCCESS),
    ("one_success", ["failed", "failed"], TaskState.UPSTREAM_FAILED),
    ("one_failed", ["success", "failed"], TaskState.SUCCESS),
    ("one_failed", ["success", "skipped"], TaskState.SKIPPED),
    ("none_failed", ["success", "skipped"], TaskState.SUCCESS),
    ("none_failed", ["success", "failed"], TaskState.UPSTREAM_FAILED),
]


async def test_trigger_rules_over_mixed_outcomes(store: Store) -> None:
    async with runtime_for(store) as rt:
        c = rt.client
        cases = []
        for rule, outcomes, expected in RULES:
            ups = [await c.submit(Step(outcome=o)) for o in outcomes]
            down = await c.submit(Step(task_id=rule), after=ups, trigger_rule=rule)
            cases.append((rule, outcomes, expected, down))
        for rule, outcomes, expected, down in cases:
            info = await c.wait(down, timeout=20)
            assert info.state == expected, (rule, outcomes, info.state, info.error)


async def test_fan_out_fan_in_cancel_and_unknown_ids(store: Store) -> None:
    async with runtime_for(store, worker=False) as rt:
        c = rt.client
        up = await c.submit(Step())
        fan = [await c.submit(Step(), after=[up]) for _ in range(20)]
        joined = await c.submit(Step(), after=fan, trigger_rule="all_done")
        with pytest.raises(TaskNotFound, match="unknown task id"):
            await c.submit(Step(), after=[up, "no-such-task"])
        assert {(await c.get(t)).state for t in [*fan, joined]} == {TaskState.DEFERRED}
        await c.cancel(up)  # one transaction: every waiter settles with it
        states = {(await c.get(t)).state for t in fan}
        assert states == {TaskState.UPSTREAM_FAILED}
        assert (await c.get(joined)).state is TaskState.QUEUED  # all_done: released, no worker


async def test_start_from_trigger_holds_no_slot_and_sees_the_event(store: Store) -> None:
    async with runtime_for(store, slots=2) as rt:
        c = rt.client
        waiting = [await c.submit(Step(), start_trigger=NeverTrigger()) for _ in range(100)]
        started = await c.submit(Step(value="go"), start_trigger=EchoTrigger(value={"run": 7}))
        plain = await c.submit(Step(value="plain"))
        info = await c.wait(started, timeout=20)
        assert (await c.wait(plain, timeout=20)).state is TaskState.SUCCESS
        assert rt.worker is not None and not rt.worker.running
        assert {(await c.get(t)).state for t in waiting} == {TaskState.DEFERRED}
    assert info.state is TaskState.SUCCESS, info.error
    assert info.result["trigger_event"] == {"run": 7}


async def test_end_from_trigger_never_reaches_a_worker(store: Store, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    async with runtime_for(store) as rt:
        c = rt.client
        ids = {
            how: await c.submit(
                Step(marker=str(marker)), start_trigger=Ends(how=how, value=how, delay=0.1)
            )
            for how in ("success", "failed", "skipped")
        }
        after = await c.submit(Step(), after=[ids["success"]])
        infos = {how: await c.wait(t, timeout=20) for how, t in ids.items()}
        assert (await c.wait(after, timeout=20)).state is TaskState.SUCCESS
    assert infos["success"].state is TaskState.SUCCESS and infos["success"].result == "success"
    assert infos["failed"].state is TaskState.FAILED
    assert "the job said no" in (infos["failed"].error or "")
    assert infos["skipped"].state is TaskState.SKIPPED
    assert not marker.exists(), "a worker ran a task its trigger had ended"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["deferrable", "poke", "reschedule"])
async def test_task_sensor_in_every_mode(store: Store, mode: str) -> None:
    async with runtime_for(store) as rt:
        c = rt.client
        target = await c.submit(Step(value="watched"), start_trigger=EchoTrigger(value=1, delay=1))
        doomed = await c.submit(Step(outcome="failed"), start_trigger=EchoTrigger(1, delay=1))
        kw = {"mode": mode, "poke_interval": 0.2, "timeout": 30}
        ok = await c.submit(TaskSensor(external_task_id=target, **kw))
        bad = await c.submit(TaskSensor(external_task_id=doomed, **kw))
        ok_info = await c.wait(ok, timeout=30)
        bad_info = await c.wait(bad, timeout=30)
    assert ok_info.state is TaskState.SUCCESS, ok_info.error
    assert ok_info.result["result"]["value"] == "watched"
    assert bad_info.state is TaskState.FAILED and "ended failed" in (bad_info.error or "")


async def test_retry_with_and_without_downstream(store: Store, tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    async with runtime_for(store) as rt:
        c = rt.client
        first = await c.submit(Step(outcome="failed", marker=str(marker)))
        second = await c.submit(Step(marker=str(marker)), after=[first])
        assert (await c.wait(second, timeout=20)).state is TaskState.UPSTREAM_FAILED
        assert await c.retry(first, downstream=True) == [first, second]
        assert (await c.get(second)).state is TaskState.DEFERRED
        assert (await c.wait(second, timeout=20)).state is TaskState.UPSTREAM_FAILED
        again = await c.get(first)
        assert again.try_number == 2 and again.state is TaskState.FAILED
        with pytest.raises(ValueError, match="not finished"):
            await c.retry(await c.submit(Step(), start_trigger=NeverTrigger()))
    await anyio.sleep(0)


# -- breaks found by attacking pipelines, kept as tests -------------------------------------


async def test_ending_a_task_and_settling_its_waiters_commit_together(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection lost between an upstream's end and its waiters' settle once left the
    waiters deferred forever on PostgreSQL (the end committed alone)."""
    from deferrun.client import build_task
    from deferrun.exceptions import StoreUnavailable

    up = build_task(Step())
    await store.submit(up)
    down = build_task(Step(), after=[up.id])
    await store.submit(down)
    [claim] = await store.claim_tasks("w1", ["default"], 1)
    connector = store.db  # type: ignore[attr-defined]
    real = type(connector)._execute if hasattr(type(connector), "_execute") else None
    assert real is not None

    def dropping(self: object, *args: object) -> object:
        step = args[-1]
        if getattr(step, "query", None) is not None and step.query.name == "waiters_by_upstream":
            raise OSError("connection dropped mid-transaction")
        return real(self, *args)  # type: ignore[misc]

    monkeypatch.setattr(type(connector), "_execute", dropping)
    with pytest.raises((StoreUnavailable, OSError)):
        await store.complete_task(up.id, claim.claim_token, '"done"')
    monkeypatch.setattr(type(connector), "_execute", real)
    assert (await store.get_task(up.id)).state is TaskState.RUNNING  # type: ignore[union-attr]
    assert await store.complete_task(up.id, claim.claim_token, '"done"')
    assert (await store.get_task(down.id)).state is TaskState.QUEUED  # type: ignore[union-attr]


async def test_after_as_a_generator_keeps_every_dependency(store: Store) -> None:
    async with runtime_for(store, worker=False) as rt:
        up = await rt.client.submit(Step())
        down = await rt.client.submit(Step(), after=(i for i in [up]))
        assert (await rt.client.dependencies(down))[0] == [up]
        assert (await rt.client.get(down)).state is TaskState.DEFERRED
        with pytest.raises(ValueError, match="task ids"):
            await rt.client.submit(Step(), after=[up + "\x00"])
        with pytest.raises(ValueError, match="task ids"):
            await rt.client.submit(Step(), after=[""])
        with pytest.raises(TypeError, match="task ids"):
            await rt.client.submit(Step(), after=[7])  # type: ignore[list-item]


async def test_retry_rearms_queued_downstream_and_respects_rules(store: Store) -> None:
    async with runtime_for(store, worker=False) as rt:
        c = rt.client
        up = await c.submit(Step())
        down = await c.submit(Step(), after=[up])
        await c.cancel(up)
        assert (await c.get(down)).state is TaskState.UPSTREAM_FAILED
        # a waiter retried on its own waits on its rule again: its upstream is still cancelled
        assert await c.retry(down) == [down]
        assert (await c.get(down)).state is TaskState.UPSTREAM_FAILED
        # retried with its downstream: the upstream is queued again, the waiter waits again
        assert await c.retry(up, downstream=True) == [up, down]
        assert (await c.get(down)).state is TaskState.DEFERRED
    async with runtime_for(store) as rt:
        assert (await rt.client.wait(down, timeout=20)).state is TaskState.SUCCESS


async def test_retry_of_a_started_task_waits_on_its_trigger_again(store: Store) -> None:
    async with runtime_for(store) as rt:
        c = rt.client
        task = await c.submit(Step(), start_trigger=EchoTrigger(value={"n": 1}, delay=0.1))
        first = await c.wait(task, timeout=20)
        assert await c.retry(task) == [task]
        assert (await c.get(task)).state is TaskState.DEFERRED
        second = await c.wait(task, timeout=20)
    assert first.result["trigger_event"] == second.result["trigger_event"] == {"n": 1}
    assert second.try_number == 2


async def test_retry_after_cancelling_a_running_task_waits_for_it_to_stop(store: Store) -> None:
    from deferrun.client import build_task

    task = build_task(Step())
    await store.submit(task)
    await store.claim_tasks("w1", ["default"], 1)
    await store.cancel_task(task.id)
    assert await store.retry_task(task.id) == [task.id]
    info = await store.get_task(task.id)
    assert info is not None and info.state is TaskState.UP_FOR_RETRY
    assert info.not_before is not None and info.not_before > info.updated_at  # type: ignore[operator]
    with pytest.raises(TaskNotFound):
        await store.retry_task("no-such-task")


async def test_a_task_cannot_watch_itself(store: Store) -> None:
    from tests.support.pipeline_userland import WatchSelf

    async with runtime_for(store) as rt:
        info = await rt.run_to_end(WatchSelf())
    assert info.state is TaskState.FAILED
    assert "cannot wait on its own end" in (info.error or ""), info.error


async def test_one_batch_may_hold_a_chain(store: Store) -> None:
    """submit_many with tasks after other tasks of the same batch, a started one first."""
    from deferrun.client import build_task

    first = build_task(Step(), start_trigger=EchoTrigger(value=1))
    second = build_task(Step(), after=[first.id])
    third = build_task(Step(), after=[second.id])
    await store.submit_many([third, second, first])
    assert (await store.dependencies(third.id))[0] == [second.id]
    async with runtime_for(store) as rt:
        assert (await rt.client.wait(third.id, timeout=20)).state is TaskState.SUCCESS


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["waiter", "started"])
async def test_a_retried_task_cancelled_while_running_waits_for_its_old_attempt(
    store: Store, kind: str
) -> None:
    """A waiter or a started task cancelled mid-run and retried at once was released at once:
    its old attempt still ran beside the new try (found by the second attack)."""
    from deferrun.client import build_task

    if kind == "waiter":
        up = build_task(Step())
        await store.submit(up)
        task = build_task(Step(), after=[up.id])
        await store.submit(task)
        [c] = await store.claim_tasks("w1", ["default"], 1)
        assert await store.complete_task(up.id, c.claim_token, '"up"')
    else:
        task = build_task(Step(), start_trigger=EchoTrigger(value=1))
        await store.submit(task)
        [trig] = await store.claim_triggers("t1", [], 10)
        assert await store.fire_triggers([(trig.id, '"go"')]) == 1
    [running] = await store.claim_tasks("w1", ["default"], 1)
    assert running.id == task.id
    await store.cancel_task(task.id)
    assert await store.retry_task(task.id) == [task.id]
    if kind == "started":
        [trig] = await store.claim_triggers("t1", [], 10)
        assert await store.fire_triggers([(trig.id, '"again"')]) == 1
    assert await store.claim_tasks("w2", ["default"], 1) == []  # held back: dead_after / 2
    with anyio.fail_after(10):  # then it runs
        while not (claimed := await store.claim_tasks("w2", ["default"], 1)):
            await anyio.sleep(0.1)
    assert claimed[0].id == task.id and claimed[0].try_number == 2


async def test_a_batch_waiting_on_itself_in_a_cycle_is_refused(store: Store) -> None:
    from msgspec.structs import replace

    from deferrun.client import build_task

    x, y = build_task(Step()), build_task(Step())
    x = replace(x, after=(y.id,), trigger_rule="all_success")
    y = replace(y, after=(x.id,), trigger_rule="all_success")
    with pytest.raises(ValueError, match="cycle"):
        await store.submit_many([x, y])
    assert await store.get_task(x.id) is None and await store.get_task(y.id) is None
