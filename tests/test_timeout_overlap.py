"""A try past its execution_timeout whose code is still running (its thread blocked in a C
call, which the interrupt reaches only when the call returns) must not let the next try start
on another worker: one task never runs twice at once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from conftest import REPO, Proc, deferrun_env
from hostile_ops import Steps

from deferrun.client import Client
from deferrun.models import TaskState


def test_the_retry_starts_only_after_the_timed_out_code_stopped(
    db_url: str, procs: Callable[..., Proc], tmp_path: Path
) -> None:
    log = tmp_path / "steps.log"
    env = deferrun_env(db_url, REPO / "tests")
    with Client(db_url) as client:
        # one time.sleep(2.5): a C call the 0.5 s timeout cannot interrupt until it returns
        ids = [
            client.submit(
                Steps(
                    log=str(log),
                    steps=1,
                    step=2.5,
                    execution_timeout=0.5,
                    retries=1,
                    retry_delay=0,
                )
            )
            for _ in range(6)
        ]
        for _ in range(2):  # two workers: the retry could start on the other one
            procs(["worker", "--slots", "2"], env)
        infos = [client.wait(i, timeout=60) for i in ids]
    assert all(i.state is TaskState.FAILED and i.try_number == 2 for i in infos), infos
    assert all("execution_timeout" in (i.error or "") for i in infos), [i.error for i in infos]
    events: dict[tuple[str, str], dict[str, float]] = {}
    for line in log.read_text().splitlines():
        kind, task_id, try_number, _pid, at = line.split()
        events.setdefault((task_id, try_number), {})[kind] = float(at)
    overlaps = [
        (task_id, events[(task_id, "1")], events[(task_id, "2")])
        for task_id in ids
        if events[(task_id, "2")]["start"] < events[(task_id, "1")]["stop"]
    ]
    assert not overlaps, overlaps  # never two tries of one task at once
