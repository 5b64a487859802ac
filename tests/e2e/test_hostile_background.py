"""User code that reaches past its own task, against real worker and triggerer processes.

A background task that raises SystemExit (asyncio re-raises it out of the event loop) must
stop only that task, never the process; a result too large to store fails its own task with a
size error (a 1 GB result once closed PostgreSQL connections and stalled the worker until it
was reaped, failing innocent tasks); and a triggerer whose trigger's cleanup() swallows every
cancellation still exits after SIGTERM.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from deferrun import Client, TaskState
from tests.support.processes import Proc, deferrun_env, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_operator_background_exit_and_oversized_result_fail_only_themselves(
    db_url: str, procs: Callable[..., Proc]
) -> None:
    from tests.support.hostile_ops import AsyncBackgroundExit, Big, Returns

    env = deferrun_env(db_url, DEFERRUN_MAX_RESULT_BYTES="100000")
    worker = procs(["worker", "--slots", "4"], env)
    with Client(db=db_url) as client:
        exits = client.submit(AsyncBackgroundExit())
        big = client.submit(Big(size=200_000))
        fits = client.submit(Big(size=50_000))
        good = [client.submit(Returns(what="thread")) for _ in range(6)]
        infos = {t: client.wait(t, timeout=30) for t in [exits, big, fits, *good]}
        after = client.wait(client.submit(Returns(what="thread")), timeout=30)
    assert worker.popen.poll() is None, worker.output()[-3000:]
    assert infos[exits].state is TaskState.SUCCESS, infos[exits].error
    assert "UserTaskExit" in worker.output() or "SystemExit" in worker.output()
    assert infos[big].state is TaskState.FAILED
    assert "over the limit of 100,000 bytes" in (infos[big].error or ""), infos[big].error
    assert infos[fits].state is TaskState.SUCCESS and len(infos[fits].result) == 50_000
    assert all(infos[t].state is TaskState.SUCCESS for t in good)
    assert after.state is TaskState.SUCCESS


def test_triggerer_exits_when_a_cleanup_swallows_cancellation(
    db_url: str, procs: Callable[..., Proc], tmp_path: Path
) -> None:
    from tests.support.hostile_userland import HostileDefer

    env = deferrun_env(
        db_url,
        DEFERRUN_TRIGGER_CLEANUP_TIMEOUT="1",
        DEFERRUN_TRIGGERER_GRACE_PERIOD="4",
    )
    triggerer = procs(["triggerer"], env)
    procs(["worker", "--slots", "2"], env)
    with Client(db=db_url) as client:
        task_id = client.submit(HostileDefer(kind="cleanup_ignores_cancel"))
        wait_until(
            lambda: client.get(task_id).triggerer_id is not None,
            timeout=30,
            message="the trigger to run in the triggerer",
        )
    started = time.monotonic()
    triggerer.popen.send_signal(signal.SIGTERM)
    try:
        code = triggerer.popen.wait(20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"triggerer ignored SIGTERM:\n{triggerer.output()[-3000:]}")
    took = time.monotonic() - started
    assert code == 0, triggerer.output()[-3000:]
    assert took < 10, took
