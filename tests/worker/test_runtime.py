"""A real worker and triggerer in this process, on a real SQLite file."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
import structlog

from deferrun import TaskEnded, TaskState
from deferrun.core.models import Deferral
from deferrun.sensors import DateTimeSensor, FileSensor, TimeDeltaSensor
from deferrun.store import Store
from tests.support.runtime import runtime_for
from tests.support.userland import AsyncDefer, DeferOnce, FlagSensor, Flaky, Outcome, SlowAsync

pytestmark = pytest.mark.anyio


async def test_defer_and_resume_with_event_and_kwargs(store: Store) -> None:
    async with runtime_for(store) as rt:
        info = await rt.run_to_end(
            DeferOnce(value={"n": 1, "at": datetime(2026, 1, 1, tzinfo=UTC)})
        )
    assert info.state is TaskState.SUCCESS, info.error
    assert info.result == {
        "event": {"n": 1, "at": datetime(2026, 1, 1, tzinfo=UTC)},
        "started_try": 1,
    }


async def test_async_execute_and_airflow_style_trigger(store: Store) -> None:
    async with runtime_for(store) as rt:
        a = await rt.run_to_end(AsyncDefer(value=7))
        b = await rt.run_to_end(DeferOnce(kind="airflow", value="porter"))
    assert a.state is TaskState.SUCCESS and a.result == ["async", 7]
    assert b.state is TaskState.SUCCESS and b.result["event"] == {"hello": "porter"}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("raise", "RuntimeError: kaboom"),
        ("silent", "returned without yielding an event"),
        ("unserializable", "event payload is a builtins.object"),
    ],
)
async def test_bad_trigger_fails_only_its_task(store: Store, kind: str, expected: str) -> None:
    async with runtime_for(store) as rt:
        bad = await rt.client.submit(DeferOnce(kind=kind, value="kaboom"))
        good = await rt.client.submit(DeferOnce(value="fine", delay=0.3))
        bad_info = await rt.client.wait(bad, timeout=20)
        good_info = await rt.client.wait(good, timeout=20)
    assert bad_info.state is TaskState.FAILED
    assert "TriggerFailed" in (bad_info.error or "") and expected in (bad_info.error or "")
    assert good_info.state is TaskState.SUCCESS


async def test_trigger_error_keeps_traceback_and_uses_retries(store: Store) -> None:
    async with runtime_for(store) as rt:
        info = await rt.run_to_end(DeferOnce(kind="raise", value="first", retries=1, retry_delay=0))
    assert info.state is TaskState.FAILED and info.try_number == 2
    assert "Traceback" in (info.error or "") and "userland.py" in (info.error or "")


async def test_forged_row_is_refused_by_triggerer(store: Store, tmp_path: Path) -> None:
    """A tampered row naming os.system never runs: the task fails, the file is not made."""
    marker = tmp_path / "pwned"
    async with runtime_for(store, worker=False) as rt:
        task_id = await rt.client.submit(DeferOnce())
        await store.register_process("w-fake", "worker", ["default"], 1)
        [claim] = await store.claim_tasks("w-fake", ["default"], 1)
        forged = Deferral(
            classpath="os.system",
            kwargs=f'{{"command": "touch {marker}"}}',
            method_name="resume",
            method_kwargs="{}",
            timeout=None,
        )
        await store.defer_task(task_id, claim.claim_token, forged)
        with anyio.fail_after(10):
            while (info := await rt.client.get(task_id)).state is TaskState.DEFERRED:
                await anyio.sleep(0.05)
        await store.deregister_process("w-fake")
    assert info.next_method == "__trigger_failed__"
    assert not marker.exists()
    await anyio.sleep(0)


async def test_forged_trigger_refused_at_defer(store: Store, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    async with runtime_for(store) as rt:
        info = await rt.run_to_end(DeferOnce(kind="forged", value=str(marker)))
    assert info.state is TaskState.FAILED
    assert "not a BaseTrigger subclass" in (info.error or "")
    assert not marker.exists()


async def test_deferral_timeout_fails_with_task_timeout(store: Store, tmp_path: Path) -> None:
    marker = tmp_path / "cleanup.txt"
    async with runtime_for(store) as rt:
        info = await rt.run_to_end(DeferOnce(kind="never", value=str(marker), timeout=0.5))
    assert info.state is TaskState.FAILED
    assert "TaskTimeout" in (info.error or "") and "deferral timed out" in (info.error or "")
    assert marker.read_text().startswith("cleanup")


async def test_blocking_trigger_is_named_and_others_survive(store: Store) -> None:
    with structlog.testing.capture_logs() as logs:
        async with runtime_for(store) as rt:
            bad = await rt.client.submit(DeferOnce(kind="block", delay=0.6))
            good = await rt.client.submit(DeferOnce(value="ok", delay=0.2))
            bad_info = await rt.client.wait(bad, timeout=20)
            good_info = await rt.client.wait(good, timeout=20)
    assert good_info.state is TaskState.SUCCESS
    assert bad_info.state is TaskState.SUCCESS  # slow, but it did fire
    blocked = [e for e in logs if "blocked the event loop" in e["event"]]
    assert blocked, [e["event"] for e in logs]
    assert blocked[0]["trigger"] == "tests.support.userland.BlockingTrigger"
    assert blocked[0]["task_id"] == bad
    assert blocked[0]["blocked_seconds"] >= 0.4


async def test_cancel_deferred_task_stops_its_trigger(store: Store, tmp_path: Path) -> None:
    marker = tmp_path / "cleanup.txt"
    async with runtime_for(store, reconcile_interval=0.2) as rt:
        task_id = await rt.client.submit(DeferOnce(kind="never", value=str(marker)))
        with anyio.fail_after(10):
            while not rt.triggerer.running:  # type: ignore[union-attr]
                await anyio.sleep(0.05)
        info = await rt.client.cancel(task_id)
        assert info.state is TaskState.CANCELLED
        with anyio.fail_after(10):
            while rt.triggerer.running:  # type: ignore[union-attr]
                await anyio.sleep(0.05)
    assert marker.read_text().startswith("cleanup")


async def test_retries_then_success(store: Store) -> None:
    async with runtime_for(store) as rt:
        info = await rt.run_to_end(Flaky(succeed_on=3, retries=2, retry_delay=0.1))
    assert info.state is TaskState.SUCCESS and info.result == 3 and info.try_number == 3


@pytest.mark.parametrize(
    ("what", "state", "error"),
    [
        ("skip", TaskState.SKIPPED, "nothing to do today"),
        ("fail", TaskState.FAILED, "bad input, do not retry"),
        ("unstorable", TaskState.FAILED, "task result cannot be stored"),
        ("bad-method", TaskState.FAILED, "no method 'no_such_method'"),
    ],
)
async def test_outcomes(store: Store, what: str, state: TaskState, error: str) -> None:
    async with runtime_for(store) as rt:
        info = await rt.run_to_end(Outcome(what=what, retries=3, retry_delay=0))
    assert info.state is state
    assert error in (info.error or "")
    assert info.try_number == 1  # none of these use a retry


@pytest.mark.slow
async def test_execution_timeout_sync_and_async(store: Store) -> None:
    async with runtime_for(store) as rt:
        sync_info = await rt.run_to_end(Outcome(what="sleep", execution_timeout=0.3))
        async_info = await rt.run_to_end(SlowAsync(execution_timeout=0.3))
    for info in (sync_info, async_info):
        assert info.state is TaskState.FAILED
        assert "execution_timeout of 0.3s exceeded" in (info.error or "")


# --------------------------------------------------------------------------- sensor modes


async def _observe(rt, task_id: str, until: float) -> set[str]:  # type: ignore[no-untyped-def]
    seen: set[str] = set()
    with anyio.move_on_after(until):
        while True:
            info = await rt.client.get(task_id)
            seen.add(str(info.state))
            if info.finished:
                break
            await anyio.sleep(0.02)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["poke", "reschedule", "deferrable"])
async def test_sensor_modes(store: Store, tmp_path: Path, mode: str) -> None:
    flag = tmp_path / "flag"
    async with runtime_for(store, slots=1) as rt:
        task_id = await rt.client.submit(
            FlagSensor(path=str(flag), mode=mode, poke_interval=0.1, timeout=30)
        )
        seen = await _observe(rt, task_id, 0.8)
        flag.write_text("x")
        info = await rt.client.wait(task_id, timeout=10)
    assert info.state is TaskState.SUCCESS and info.try_number == 1
    pokes = Path(str(flag) + ".pokes").read_text().split() if mode != "deferrable" else []
    if mode == "poke":
        assert seen - {"queued"} == {"running"}  # after its claim, it held the slot throughout
        assert len(pokes) >= 3
    elif mode == "reschedule":
        assert "up_for_reschedule" in seen
        assert len(pokes) >= 3 and set(pokes) == {"1"}  # reschedules are not new tries
    else:
        assert "deferred" in seen
        assert not Path(str(flag) + ".pokes").exists()  # the triggerer did the waiting


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["poke", "reschedule", "deferrable"])
async def test_sensor_timeout_and_soft_fail(store: Store, tmp_path: Path, mode: str) -> None:
    missing = str(tmp_path / "never")
    async with runtime_for(store) as rt:
        hard = await rt.client.submit(
            FlagSensor(path=missing, mode=mode, poke_interval=0.1, timeout=0.4, retries=2)
        )
        soft = await rt.client.submit(
            FlagSensor(path=missing, mode=mode, poke_interval=0.1, timeout=0.4, soft_fail=True)
        )
        hard_info = await rt.client.wait(hard, timeout=15)
        soft_info = await rt.client.wait(soft, timeout=15)
    assert hard_info.state is TaskState.FAILED and hard_info.try_number == 1  # no retry
    assert "timed out" in (hard_info.error or "")
    assert soft_info.state is TaskState.SKIPPED


async def test_builtin_time_and_file_sensors(store: Store, tmp_path: Path) -> None:
    target = datetime.now(UTC) + timedelta(seconds=0.5)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_text("1")
    async with runtime_for(store) as rt:
        ids = [
            await rt.client.submit(DateTimeSensor(target_time=target, mode=m, poke_interval=0.1))
            for m in ("poke", "reschedule", "deferrable")
        ] + [
            await rt.client.submit(TimeDeltaSensor(delta=0.3, mode="deferrable")),
            await rt.client.submit(
                FileSensor(
                    filepath=str(tmp_path / "in" / "*.csv"), mode="deferrable", poke_interval=0.1
                )
            ),
        ]
        infos = [await rt.client.wait(i, timeout=15) for i in ids]
    assert [i.state for i in infos] == [TaskState.SUCCESS] * 5, [i.error for i in infos]
    assert infos[0].result == target and infos[2].result == target
    assert infos[4].result == [str(tmp_path / "in" / "a.csv")]


async def test_cancelling_an_ended_task_is_refused(store: Store) -> None:
    """As the command and README say: Client.cancel raises TaskEnded and changes nothing."""
    async with runtime_for(store, triggerer=False) as rt:
        done = await rt.run_to_end(Outcome(what="skip"))
        with pytest.raises(TaskEnded, match=f"task {done.id} already ended skipped"):
            await rt.client.cancel(done.id)
        assert (await rt.client.get(done.id)).state is TaskState.SKIPPED
