"""A database locked (not down) for longer than dead_after: heartbeats wait on the lock rather
than fail. When it lifts, nobody may reap the healthy fleet: no task runs twice."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from deferrun import Client
from deferrun.core.models import TaskState
from tests.support.hostile_ops import Steps
from tests.support.processes import Proc, deferrun_env, wait_until

pytestmark = pytest.mark.slow


def test_sqlite_lock_longer_than_dead_after_reaps_no_one(
    sqlite_url: str, tmp_path: Path, procs: Callable[..., Proc]
) -> None:
    log = tmp_path / "steps.log"
    env = deferrun_env(sqlite_url, dead_after="3")
    worker = procs(["worker", "--slots", "2"], env)
    triggerer = procs(["triggerer"], env)
    wait_until(lambda: "worker started" in worker.output(), 20, message="the worker to start")
    wait_until(lambda: "triggerer started" in triggerer.output(), 20, message="the triggerer")
    with Client(sqlite_url) as client:
        ids = [client.submit(Steps(log=str(log), steps=60, step=0.2, retries=1)) for _ in range(2)]

        def starts() -> int:
            return log.read_text().count("start ") if log.exists() else 0

        wait_until(lambda: starts() == 2, 20, message="both tasks to start")
        locked = threading.Event()

        def hold_the_lock() -> None:  # the fault itself: a lock held 2 x dead_after
            conn = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), timeout=10)
            try:
                conn.execute("BEGIN EXCLUSIVE")
                locked.set()
                time.sleep(6.0)
                conn.execute("ROLLBACK")
            finally:
                conn.close()

        holder = threading.Thread(target=hold_the_lock)
        holder.start()
        assert locked.wait(10)
        holder.join(20)
        infos = [client.wait(i, timeout=40) for i in ids]
    assert [i.state for i in infos] == [TaskState.SUCCESS] * 2, infos
    assert [i.try_number for i in infos] == [1, 1], infos
    assert starts() == 2, log.read_text()
