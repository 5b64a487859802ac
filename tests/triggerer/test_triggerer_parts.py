"""The triggerer's parts on their own: run_trigger == the triggerer's path, the event writer's
retry policy, reconcile vs. unwritten events, re-claims, the watchdog, /healthz."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from structlog.testing import capture_logs

from deferrun import TaskState
from deferrun.core.models import ClaimedTrigger
from deferrun.exceptions import StoreUnavailable, TriggerFailed
from deferrun.process.metrics import serve
from deferrun.process.watchdog import LoopWatchdog, timed_steps
from deferrun.store import Store
from deferrun.store.base import is_connection_error
from deferrun.testing import arun_trigger
from deferrun.triggerer.event_writer import EventWriter
from deferrun.triggerer.trigger_run import FAILED, FIRED, Limits, Outcome, load
from deferrun.triggerer.triggerer import Triggerer
from tests.support.hostile_userland import HostileDefer, make_trigger
from tests.support.pgcluster import free_port
from tests.support.runtime import runtime_for
from tests.triggerer.test_hostile_triggers import BAD
from triggers.time import DateTimeTrigger

pytestmark = pytest.mark.anyio

# what the trigger's own code raised reaches the test as is; everything else as TriggerFailed
RAISED_AS_IS = {
    "raise_exception": RuntimeError,
    "init_raises": ValueError,
    "timer_raises": ZeroDivisionError,
    "background_exit": RuntimeError,
    "init_bad_str": Exception,  # its own class, which cannot even be printed
}


@pytest.mark.parametrize("kind", sorted(k for k, (t, _) in BAD.items() if t is None))
async def test_run_trigger_fails_like_the_triggerer(kind: str) -> None:
    """deferrun.testing gives the very message the task would get from the triggerer."""
    expected = RAISED_AS_IS.get(kind, TriggerFailed)
    with pytest.raises(expected) as err:
        await arun_trigger(make_trigger(kind, 0.0), timeout=5)
    if expected is TriggerFailed:
        assert BAD[kind][1] in str(err.value)


async def test_run_trigger_timer_path_ids_and_timeout(tmp_path: Path) -> None:
    moment = datetime.now(UTC) + timedelta(seconds=0.2)
    event = await arun_trigger(DateTimeTrigger(moment=moment), timeout=5)
    assert event.payload == moment and datetime.now(UTC) >= moment
    from tests.support.hostile_userland import CountRuns

    event = await arun_trigger(CountRuns(path=str(tmp_path / "r")), trigger_id=7, task_id="t-1")
    assert event.payload == {"trigger_id": 7, "task_id": "t-1"}
    with pytest.raises(TimeoutError, match="deferral timed out"):
        await arun_trigger(CountRuns(path=str(tmp_path / "r"), fire=False), timeout=0.2)
    later = datetime.now(UTC) + timedelta(hours=1)
    with pytest.raises(TimeoutError, match="a timer"):
        await arun_trigger(DateTimeTrigger(moment=later), timeout=0.2)


@pytest.mark.parametrize("timeout_in", ["soon", float("nan"), float("inf"), [1]])
def test_stored_deadline_of_the_wrong_type_fails_clearly(timeout_in: Any) -> None:
    row = ClaimedTrigger(7, "t", "tests.support.hostile_userland.Placeholder", "{}", timeout_in)
    outcome = load(row, Limits())
    assert isinstance(outcome, Outcome) and outcome.method == FAILED
    assert "stored deadline that is not a time" in (outcome.error or "")


def test_is_connection_error() -> None:
    import sqlite3

    assert is_connection_error(StoreUnavailable("down"))
    assert is_connection_error(ConnectionResetError())
    assert is_connection_error(sqlite3.OperationalError("database is locked"))
    assert not is_connection_error(sqlite3.OperationalError("no such column: x"))
    assert not is_connection_error(ValueError("bad payload"))


class FlakyStore:
    """A store whose writes fail as told: ``down`` times with StoreUnavailable, and always
    with ValueError for a batch holding a poisoned payload."""

    def __init__(self, down: int = 0) -> None:
        self.down = down
        self.fired: list[int] = []
        self.failed: dict[int, str] = {}

    async def fire_triggers(self, events: list[tuple[int, str]]) -> int:
        if self.down:
            self.down -= 1
            raise StoreUnavailable("database unreachable")
        if any("poison" in payload for _, payload in events):
            raise ValueError("value too long for the column")
        self.fired += [tid for tid, _ in events]
        return len(events)

    async def fail_triggers(self, failures: list[tuple[int, str, str]]) -> int:
        if self.down:
            self.down -= 1
            raise StoreUnavailable("database unreachable")
        self.failed.update({tid: payload for tid, _, payload in failures})
        return len(failures)


async def drain(writer: EventWriter) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer.run)
        with anyio.fail_after(10):
            while writer.pending:
                await anyio.sleep(0.01)
        writer.close()


async def test_writer_fails_only_the_poisoned_item_and_retries_outages() -> None:
    store = FlakyStore(down=2)
    writer = EventWriter(store)  # type: ignore[arg-type]
    for tid in range(20):
        writer.put(Outcome(tid, FIRED, '"fine"'))
    writer.put(Outcome(99, FIRED, '"poison"'))
    assert not writer.put(Outcome(99, FIRED, '"again"'))  # never two outcomes per trigger
    await drain(writer)
    assert sorted(store.fired) == list(range(20))
    assert (
        list(store.failed) == [99]
        and "could not store the event of trigger 99" in (store.failed[99])
    )


async def test_reconcile_never_releases_a_fired_unwritten_trigger(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The event waits in the writer (its write is held up) across many full reconciles
    (every held id fetched; the quick count check is off): the trigger is neither released
    nor run again, and the task resumes once."""
    from deferrun.triggerer import reconcile

    monkeypatch.setattr(reconcile, "FULL_RECONCILE_EVERY", 0.0)
    gate = anyio.Event()
    runs = tmp_path / "runs"
    reconciles = 0

    class HeldStore:
        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        async def fire_triggers(self, events: Any) -> int:
            await gate.wait()
            return await store.fire_triggers(events)

        async def owned_trigger_ids(self, triggerer_id: str) -> set[int]:
            nonlocal reconciles
            reconciles += 1
            return await store.owned_trigger_ids(triggerer_id)

    held: Any = HeldStore()
    async with runtime_for(store, triggerer=False) as rt:
        t = Triggerer(held, dead_after=2.0, reconcile_interval=0.05, poll_interval=0.05)
        async with anyio.create_task_group() as tg:
            tg.start_soon(t.run)
            task_id = await rt.client.submit(HostileDefer(kind="count", runs=str(runs)))
            with anyio.fail_after(10):
                while not t.writer.pending:
                    await anyio.sleep(0.02)
                start = reconciles
                while reconciles < start + 10:
                    await anyio.sleep(0.02)
            assert len(runs.read_text().splitlines()) == 1
            trigger_id = next(iter(t.writer.pending))
            assert trigger_id in await store.owned_trigger_ids(t.id)  # not released
            gate.set()
            info = await rt.client.wait(task_id, timeout=10)
            t.stop()
    assert info.state is TaskState.SUCCESS
    assert len(runs.read_text().splitlines()) == 1


async def test_reclaiming_a_running_or_pending_id_does_not_start_it_twice(
    store: Store, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    async with runtime_for(store, reconcile_interval=60) as rt:
        t = rt.triggerer
        assert t is not None
        await rt.client.submit(HostileDefer(kind="count_never", runs=str(runs)))
        with anyio.fail_after(10):
            while not (runs.exists() and runs.read_text()):
                await anyio.sleep(0.02)
        (trigger_id,) = t.running
        first = t.running[trigger_id]
        row = ClaimedTrigger(
            trigger_id,
            "x",
            "tests.support.hostile_userland.CountRuns",
            f'{{"path": "{runs}"}}',
            None,
        )
        t._start(row)
        t._start(row)
        await anyio.sleep(0.2)  # give a second run() the chance to show up (it must not)
        assert t.running[trigger_id] is first and len(runs.read_text().splitlines()) == 1
        t.writer.put(Outcome(12345, FIRED, "1"))  # pending in the writer: not started either
        t._start(ClaimedTrigger(12345, "y", "tests.support.hostile_userland.CountRuns", "{}", None))
        assert 12345 not in t.running


@pytest.mark.slow
async def test_watchdog_blames_one_long_step_not_a_burst() -> None:
    watchdog = LoopWatchdog(threshold=0.2)

    def describe(name: str) -> dict[str, Any]:
        return {"trigger_id": int(name.split(":")[1]), "trigger": "T"} if ":" in name else {}

    async def short() -> None:
        for _ in range(2):
            sum(range(400))  # ~10 us of work per step
            await asyncio.sleep(0)

    async def blocker() -> None:
        await asyncio.sleep(0)
        time.sleep(0.4)

    async def timed(coro: Any) -> None:
        await timed_steps(coro, watchdog, describe)

    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watchdog.run)
            await anyio.sleep(0.1)
            loop = asyncio.get_running_loop()
            burst = [loop.create_task(timed(short()), name=f"trigger:{i}") for i in range(20000)]
            await asyncio.gather(*burst)
            await anyio.sleep(0.2)
            burst_logs = list(logs)
            await loop.create_task(timed(blocker()), name="trigger:7")
            await anyio.sleep(0.2)
            tg.cancel_scope.cancel()
    assert not [e for e in burst_logs if "blocked the event loop" in e["event"]], burst_logs
    assert [e for e in burst_logs if "lagging under load" in e["event"]], burst_logs
    blamed = [e for e in logs if "blocked the event loop" in e["event"]]
    assert [e["trigger_id"] for e in blamed] == [7] and blamed[0]["blocked_seconds"] >= 0.4


async def test_healthz_503_while_events_cannot_be_stored(store: Store) -> None:
    t = Triggerer(store, dead_after=2.0)
    t.writer.store = FlakyStore(down=10**6)  # type: ignore[assignment]
    t.writer_unhealthy_after = 0.3
    port = free_port()
    url = f"http://127.0.0.1:{port}/healthz"
    async with anyio.create_task_group() as tg, aiohttp.ClientSession() as http:
        await tg.start(serve, t.metrics, "127.0.0.1", port, lambda: (True, {"database_ok": True}))
        async with http.get(url) as resp:
            assert resp.status == 200
        tg.start_soon(t.writer.run)
        t.writer.put(Outcome(1, FIRED, "1"))
        status, body = 200, {}
        with anyio.fail_after(10):
            while status == 200:
                await anyio.sleep(0.05)
                async with http.get(url) as resp:
                    status, body = resp.status, await resp.json()
        assert status == 503 and body["events_pending_write"] == 1
        assert "database unreachable" in body["events_write_error"]
        tg.cancel_scope.cancel()


def test_event_payload_size_limit() -> None:
    from deferrun.triggerer.trigger_run import Misbehaved, event_payload

    assert event_payload({"k": "v" * 100}, "c.T", 1024).startswith("{")
    for payload in ("x" * 2000, {"nested": ["y" * 2000]}, "é" * 600):
        with pytest.raises(Misbehaved, match="over the limit of 1024 bytes"):
            event_payload(payload, "c.T", 1024)
