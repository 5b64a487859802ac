"""The loop watchdog names a trigger whose code blocks the loop outside a run() step (its
cleanup(), on_task_cancelled(), a background task it started), and blames no trigger for a
pause of the whole process (SIGSTOP)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from deferrun import Client
from deferrun.core.models import ClaimedTrigger
from deferrun.store import Store
from deferrun.triggerer.triggerer import TASK_CANCELLED
from tests.process.test_operations import get, metric
from tests.support.pgcluster import free_port
from tests.support.processes import Proc, deferrun_env, wait_until
from tests.support.runtime import runtime_for
from tests.support.watchdog_userland import DeferToTicker

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

CASES = {
    # kind: (classpath, kwargs, what the warning says ran)
    "cleanup": ("tests.support.watchdog_userland.BlockingCleanup", {"seconds": 0.6}, "cleanup()"),
    "background": (
        "tests.support.watchdog_userland.BlockingBackground",
        {"seconds": 0.6},
        "a background task its run() started",
    ),
    "named_background": (
        "tests.support.watchdog_userland.BlockingBackground",
        {"seconds": 0.6, "name": "users-own-name"},
        "a background task its run() started",
    ),
    "finally": (
        "tests.support.watchdog_userland.BlockingFinally",
        {"seconds": 0.6},
        "the finally of its run()",
    ),
    "hook": (
        "tests.support.watchdog_userland.BlockingHook",
        {"seconds": 0.6},
        "on_task_cancelled()",
    ),
}


@pytest.mark.parametrize("kind", [*sorted(CASES), "background_under_load"])
async def test_blocking_trigger_code_outside_run_is_named(store: Store, kind: str) -> None:
    """Named also when the loop was already lagging under a burst of short steps."""
    load = kind.endswith("_under_load")
    classpath, kwargs, ran = CASES[kind.removesuffix("_under_load")]
    trigger_id, task_id = 900_001, "blocking-task"
    with capture_logs() as logs:
        async with runtime_for(store, worker=False, reconcile_interval=60) as rt:
            t = rt.triggerer
            assert t is not None
            await anyio.sleep(0.3)  # the watchdog is ticking
            if load:  # 20,000 short tasks: the loop lags before and while the trigger blocks
                burst = [asyncio.ensure_future(_short()) for _ in range(20_000)]
            t._start(ClaimedTrigger(trigger_id, task_id, classpath, json.dumps(kwargs), None))
            if kind == "hook":
                with anyio.fail_after(10):
                    while not t.running[trigger_id].task:  # type: ignore[union-attr]
                        await anyio.sleep(0.02)
                await anyio.sleep(0.1)
                t._cancel(t.running[trigger_id], TASK_CANCELLED)  # type: ignore[arg-type]

            def named() -> list[dict[str, Any]]:
                return [e for e in logs if "blocked the event loop" in e["event"]]

            with anyio.fail_after(10):
                while not named():
                    await anyio.sleep(0.05)
            if load:
                await asyncio.gather(*burst)
    blamed = named()
    assert len(blamed) == 1, [e["event"] for e in logs if "loop" in e["event"]]
    line = blamed[0]
    assert line["trigger_id"] == trigger_id and line["task_id"] == task_id, line
    assert line["trigger"] == classpath and line["ran"] == ran, line
    assert f"trigger {trigger_id}" in line["event"] and ran in line["event"], line
    if kind == "named_background":
        assert line["asyncio_task"] == "users-own-name", line
    if not load:
        assert not [e for e in logs if "lagging under load" in e["event"]]


async def _short() -> None:
    for _ in range(3):
        sum(range(400))
        await asyncio.sleep(0)


def test_sigstop_is_a_pause_not_a_blocking_trigger(
    db_url: str, procs: Callable[..., Proc], tmp_path: Path
) -> None:
    """Stop a triggerer whose 16 triggers keep it busy in their steps most of the time (so one
    is likely mid-step) three times for 1.5 s: each pause is logged once as a pause, no trigger
    is blamed, nothing is called load and deferrun_loop_blocked_total stays 0."""
    marker = tmp_path / "started"
    env = deferrun_env(db_url, dead_after="30")
    port = free_port()
    triggerer = procs(
        ["triggerer", "--metrics-port", str(port), "--metrics-host", "127.0.0.1"], env
    )
    procs(["worker", "--slots", "8"], env)
    with Client(db=db_url) as client:
        client.submit_many([DeferToTicker(n=i, marker=str(marker)) for i in range(16)])
    wait_until(
        lambda: marker.exists() and len(marker.read_text().split()) == 16,
        60,
        message="all triggers run",
    )
    for stops in range(1, 4):
        os.kill(triggerer.popen.pid, signal.SIGSTOP)
        time.sleep(1.5)  # the pause itself
        os.kill(triggerer.popen.pid, signal.SIGCONT)
        try:  # the old code said "blocked" or "lagging under load" instead
            wait_until(
                lambda n=stops: len(_lines(triggerer, *LOOP_WARNINGS)) >= n,  # type: ignore[misc]
                10,
                message=f"pause {stops} logged",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{triggerer.output()[-3000:]}") from None
    blamed = _lines(triggerer, "blocked the event loop")
    assert not blamed, blamed
    assert not _lines(triggerer, "lagging under load"), triggerer.output()[-3000:]
    paused = _lines(triggerer, "process was paused")
    assert len(paused) == 3 and all(p["paused_seconds"] >= 1.0 for p in paused), paused
    status, text = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200 and metric(text, "deferrun_loop_blocked_total") == 0, text[-2000:]


LOOP_WARNINGS = ("blocked the event loop", "event loop blocked", "lagging under load", "paused")


def _lines(proc: Proc, *texts: str) -> list[dict[str, Any]]:
    """The process's JSON log lines whose event mentions any of ``texts``."""
    lines = [json.loads(line) for line in proc.output().splitlines() if line.startswith("{")]
    return [e for e in lines if any(t in e.get("event", "") for t in texts)]


async def test_every_trigger_that_blocked_in_one_stall_is_named_and_counted(
    store: Store,
) -> None:
    """Three triggers blocking back to back in one stall: only the longest was named, and the
    stall counted once."""
    with capture_logs() as logs:
        async with runtime_for(store, worker=False, reconcile_interval=60) as rt:
            t = rt.triggerer
            assert t is not None
            await anyio.sleep(0.3)  # the watchdog is ticking
            blocked0 = t.watchdog.blocked_total if t.watchdog else 0
            at = time.time() + 0.3
            for i in range(3):
                kwargs = json.dumps({"at": at, "seconds": 0.3 + i * 0.05})
                classpath = "tests.support.watchdog_userland.BlocksInRun"
                t._start(ClaimedTrigger(900_100 + i, f"trio-{i}", classpath, kwargs, None))

            def named() -> set[Any]:
                return {e.get("trigger_id") for e in logs if "blocked the event loop" in e["event"]}

            with anyio.fail_after(10):
                while len(named()) < 3:
                    await anyio.sleep(0.05)
            assert t.watchdog is not None
            assert t.watchdog.blocked_total - blocked0 == 3
    assert named() == {900_100, 900_101, 900_102}
