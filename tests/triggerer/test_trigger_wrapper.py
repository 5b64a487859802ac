"""The light per-trigger wrapper: one coroutine frame per live trigger, ids on the lines its
code logs, the cheap "trigger fired" line, and deadlines without a timeout object each."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog
from structlog.testing import LogCapture

from deferrun import TaskState
from deferrun.core.baseoperator import BaseOperator
from deferrun.core.basetrigger import BaseTrigger, TriggerEvent
from deferrun.core.models import ClaimedTrigger
from deferrun.process import containment
from deferrun.process.log import configure_logging
from deferrun.process.tasklogs import TaskLogSink
from deferrun.store import Store
from deferrun.triggerer.trigger_run import FIRED, TIMED_OUT
from deferrun.triggerer.triggerer import Triggerer
from tests.support.runtime import runtime_for

pytestmark = pytest.mark.anyio

user_log = structlog.get_logger("usercode.trigger")  # a module logger, not self.log


class LogsThenFires(BaseTrigger):
    """Logs from its own code and from a task it starts, then fires after ``delay``."""

    shareable = False  # each task gets its own run() (the light wrapper, not a shared run)

    def __init__(self, n: int, delay: float = 0.0) -> None:
        self.n, self.delay = n, delay

    async def run(self) -> AsyncIterator[TriggerEvent]:
        user_log.info("hello from trigger code", n=self.n)

        async def helper() -> None:
            user_log.info("hello from a task the trigger started")

        await asyncio.ensure_future(helper())
        await asyncio.sleep(self.delay)
        yield TriggerEvent({"n": self.n})


class Never(BaseTrigger):
    shareable = False

    def __init__(self, n: int = 0) -> None:
        self.n = n

    async def run(self) -> AsyncIterator[TriggerEvent]:
        await asyncio.sleep(3600)
        yield TriggerEvent(None)


class HookedNever(BaseTrigger):
    """Waits forever; its on_task_cancelled() records its ids (and the trigger's log ids)."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def run(self) -> AsyncIterator[TriggerEvent]:
        await asyncio.sleep(3600)
        yield TriggerEvent(None)

    async def on_task_cancelled(self) -> None:
        code = containment.current_trigger()
        ids = (code.trigger_id, code.task_id) if code is not None else None
        with open(self.path, "a") as f:
            f.write(json.dumps([self.trigger_id, self.task_id, ids]) + "\n")


class AnsweringHooked(HookedNever):
    """Answers its cancellation with an event, as many Airflow triggers do."""

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            yield TriggerEvent({"status": "cancelled"})
            return
        yield TriggerEvent(None)


class DeferHooked(BaseOperator):
    def __init__(self, *, path: str, answers: bool = False, **kw: Any) -> None:
        super().__init__(**kw)
        self.path, self.answers = path, answers

    def execute(self, context: Any) -> Any:
        trigger = (AnsweringHooked if self.answers else HookedNever)(path=self.path)
        self.defer(trigger=trigger, method_name="resume")

    def resume(self, context: Any, event: Any = None) -> Any:
        return event


class DeferOn(BaseOperator):
    def __init__(self, *, n: int, never: bool = False, timeout: float | None = None, **kw: Any):
        super().__init__(**kw)
        self.n, self.never, self.timeout = n, never, timeout

    def execute(self, context: Any) -> Any:
        from datetime import timedelta

        trigger = Never(n=self.n) if self.never else LogsThenFires(n=self.n)
        timeout = None if self.timeout is None else timedelta(seconds=self.timeout)
        self.defer(trigger=trigger, method_name="resume", timeout=timeout)

    def resume(self, context: Any, event: Any = None) -> Any:
        return event


@pytest.fixture
def json_logs() -> Iterator[LogCapture]:
    """The processes' real logging processors (they add the ids and store task lines), with
    the rendered output captured instead of printed; restored after."""
    saved = structlog.get_config()
    root = logging.getLogger()
    saved_root = (root.level, list(root.handlers))
    configure_logging("json", "info")
    capture = LogCapture()
    processors = structlog.get_config()["processors"]
    structlog.configure(processors=[*processors[:-1], capture])
    try:
        yield capture
    finally:
        structlog.configure(**saved)
        root.setLevel(saved_root[0])
        root.handlers[:] = saved_root[1]


async def test_trigger_code_lines_and_fired_reach_the_task_log(
    store: Store, json_logs: LogCapture
) -> None:
    """Lines a trigger's code logs through any logger carry its ids and reach its task's
    stored log, as does "trigger fired"; stderr says "triggers fired" once per loop step."""
    sink = TaskLogSink(store, "test", flush_interval=0.05)
    n = 20
    async with anyio.create_task_group() as tg:
        tg.start_soon(sink.run)
        # a generous liveness window: on a loaded machine a 2 s one lets a slow heartbeat
        # count as a death, and a trigger re-run on adoption would fire (and count) twice
        async with runtime_for(store, slots=4, dead_after=10.0) as rt:
            ids = [await rt.client.submit(DeferOn(n=i)) for i in range(n)]
            for task_id in ids:
                info = await rt.client.wait(task_id, timeout=30)
                assert info.state is TaskState.SUCCESS, info
        await sink.flush()
        tg.cancel_scope.cancel()
    for i, task_id in enumerate(ids):
        lines = [json.loads(line) for _, _, line in await store.task_logs(task_id)]
        mine = {e["event"]: e for e in lines if e.get("trigger_id") is not None}
        for what in ("hello from trigger code", "hello from a task the trigger started"):
            assert mine[what]["task_id"] == task_id, lines
        assert mine["hello from trigger code"]["n"] == i
        fired = mine["trigger fired"]
        assert fired["task_id"] == task_id and fired["level"] == "info" and fired["timestamp"]
    err = json_logs.entries
    summaries = [e for e in err if e["event"] == "triggers fired"]
    assert sum(e["count"] for e in summaries) == n
    assert not [e for e in err if e["event"] == "trigger fired"]  # not one line per fire


async def test_one_frame_per_live_trigger_and_no_ids_outside(store: Store) -> None:
    """A live trigger's task runs run_until_event itself (no wrapper coroutines around it),
    and the context variable marking its code does not leak out of its task."""
    t = Triggerer(store, dead_after=2.0)
    t._start(ClaimedTrigger(1, "task-1", f"{__name__}.Never", '{"n": 1}', None))
    run = t.running[1]
    task = run.task  # type: ignore[union-attr]
    await anyio.sleep(0.05)
    coro = task.get_coro()
    assert coro.cr_code.co_name == "run_until_event"
    inner = coro.cr_await  # the step handed to the task: not another coroutine of ours
    assert not hasattr(inner, "cr_code"), inner
    assert containment.current_trigger() is None
    task.cancel()
    with anyio.fail_after(5):
        while 1 in t.running:
            await anyio.sleep(0.01)
    assert task.cancelled()


@pytest.mark.slow
async def test_deadlines_fire_and_events_before_them_win(store: Store) -> None:
    """A deferral timeout still ends a waiting trigger, and a trigger that fires before its
    deadline is not timed out afterwards (the deadline's timer is cancelled with it)."""
    t = Triggerer(store, dead_after=2.0)
    seen: dict[int, str] = {}
    t.writer.put = lambda o: seen.setdefault(o.trigger_id, o.method) == o.method  # type: ignore[method-assign]
    began = time.monotonic()
    t._start(ClaimedTrigger(1, "a", f"{__name__}.Never", '{"n": 1}', 0.3))
    t._start(ClaimedTrigger(2, "b", f"{__name__}.LogsThenFires", '{"n": 2, "delay": 0.05}', 0.6))
    t._start(ClaimedTrigger(3, "c", f"{__name__}.Never", '{"n": 3}', None))
    with anyio.fail_after(10):
        while len(seen) < 2:
            await anyio.sleep(0.01)
    assert seen == {2: FIRED, 1: TIMED_OUT} and time.monotonic() - began >= 0.3
    await anyio.sleep(0.7)  # past trigger 2's deadline: it fired, nothing more may come
    assert seen == {2: FIRED, 1: TIMED_OUT} and 3 in t.running
    t._cancel(t.running[3], "shutdown")
    with anyio.fail_after(5):
        while 3 in t.running:
            await anyio.sleep(0.01)
    assert 3 not in seen


async def test_timeout_through_the_runtime(store: Store) -> None:
    async with runtime_for(store, slots=2) as rt:
        task_id = await rt.client.submit(DeferOn(n=1, never=True, timeout=0.5))
        info = await rt.client.wait(task_id, timeout=30)
    assert info.state is TaskState.FAILED and "timed out" in (info.error or ""), info


@pytest.mark.slow
@pytest.mark.parametrize("answers", [False, True], ids=["waits", "answers-with-an-event"])
async def test_on_task_cancelled_runs_once_on_a_user_cancel_only(
    store: Store, tmp_path: Path, answers: bool
) -> None:
    """The hook runs (once, marked as that trigger's code) when a user cancels the waiting
    task, and not when the triggerer shuts down; also when the trigger answers its
    cancellation with an event (``except CancelledError: yield TriggerEvent(...)``, as many
    Airflow triggers do): the task stays cancelled and the event is dropped."""
    cancelled, kept = tmp_path / "cancelled", tmp_path / "kept"
    async with runtime_for(store, slots=2, reconcile_interval=0.1) as rt:
        one = await rt.client.submit(DeferHooked(path=str(cancelled), answers=answers))
        two = await rt.client.submit(DeferHooked(path=str(kept), answers=answers))
        with anyio.fail_after(20):
            while len(rt.triggerer.running) < 2:  # type: ignore[union-attr]
                await anyio.sleep(0.02)
        await rt.client.cancel(one)
        with anyio.fail_after(20):
            while not cancelled.exists():
                await anyio.sleep(0.02)
        await anyio.sleep(0.3)  # a few more reconciles: it must not run again
        assert (await rt.client.get(one)).state is TaskState.CANCELLED
        assert (await rt.client.get(two)).state is TaskState.DEFERRED
    [line] = cancelled.read_text().splitlines()
    trigger_id, task_id, ids = json.loads(line)
    assert task_id == one and ids == [trigger_id, one]
    assert not kept.exists()  # shutdown is no cancel of the task


@pytest.mark.parametrize("kind", ["future", "task", "await"])
def test_an_async_iterator_may_step_with_any_awaitable(kind: str) -> None:
    from deferrun.testing import run_trigger
    from tests.support.hostile_userland import AwaitablesRun

    assert run_trigger(AwaitablesRun(kind=kind), timeout=10).payload == {"via": kind}


def test_a_step_that_is_not_awaitable_names_the_iterator() -> None:
    from deferrun.exceptions import TriggerFailed
    from deferrun.testing import run_trigger
    from tests.support.hostile_userland import AwaitablesRun

    with pytest.raises((TriggerFailed, TypeError), match="not awaitable"):
        run_trigger(AwaitablesRun(kind="int"), timeout=10)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
