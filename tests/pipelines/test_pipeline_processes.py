"""Pipelines across real processes: a worker SIGKILLed while it runs an upstream task."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from deferrun import Client, TaskState
from tests.cli.test_cli import _create_database
from tests.support.pipeline_userland import Step
from tests.support.processes import Proc, deferrun_env, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def runs(marker: Path) -> list[tuple[str, int, int]]:
    """(task id, try number, pid) of every execution, in the order they started."""
    if not marker.exists():
        return []
    return [
        (t, int(n), int(p))
        for t, n, p in (ln.split() for ln in marker.read_text().split("\n") if ln)
    ]


def test_sigkilled_upstream_worker_downstream_resolves_once_after_the_retry(
    db_url: str, tmp_path: Path, procs: Callable[..., Proc]
) -> None:
    env = deferrun_env(db_url, dead_after="2")
    marker = tmp_path / "runs.txt"
    anyio.run(_create_database, db_url)
    with Client(db_url) as client:
        up = client.submit(
            Step(value="up", marker=str(marker), sleep_first=120, retries=1, retry_delay=0)
        )
        down = client.submit(Step(value="down", marker=str(marker)), after=[up])

        first = procs(["worker", "--slots", "2"], env)
        wait_until(lambda: runs(marker), 30, message="the upstream's first try to start")
        assert runs(marker) == [(up, 1, first.popen.pid)]
        first.kill()  # SIGKILL: no goodbye, the task stays 'running' under a dead worker
        first.popen.wait(10)
        assert client.get(up).state is TaskState.RUNNING
        assert client.get(down).state is TaskState.DEFERRED

        second = procs(["worker", "--slots", "2"], env)
        info = client.wait(down, timeout=60)
        up_info = client.get(up)

    assert up_info.state is TaskState.SUCCESS and up_info.try_number == 2, up_info.error
    assert info.state is TaskState.SUCCESS, info.error
    assert info.result["upstream"] == {up: up_info.result}
    assert runs(marker) == [
        (up, 1, first.popen.pid),
        (up, 2, second.popen.pid),
        (down, 1, second.popen.pid),  # exactly once, and only after the retry started
    ]
    assert info.started_at is not None and up_info.finished_at is not None
    assert info.started_at >= up_info.finished_at
