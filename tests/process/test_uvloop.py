"""The optional uvloop event loop (``DEFERRUN_LOOP``), with real triggerer and worker processes.

What depends on asyncio internals is exercised under uvloop on both backends: the user-code
task factory (a background SystemExit stays contained), the loop watchdog (a blocking trigger
is named), asyncio.timeout (a deferral timeout), the in-place close of a fired trigger's
generator, and SIGTERM handling.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

from deferrun import Client, TaskState
from deferrun.cli import commands as cli
from deferrun.exceptions import ConfigError
from deferrun.process import loops
from tests.support.processes import Proc, deferrun_env, wait_until

HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """cli.main configures logging onto this test's captured stderr: undo it afterwards."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def need_uvloop() -> None:
    if HAS_UVLOOP:
        return
    if os.environ.get("CI") == "true":
        pytest.fail("uvloop not installed; .ci/run installs the 'uvloop' extra", pytrace=False)
    pytest.skip("uvloop not installed (pip install 'deferrun[uvloop]')")


def loop_lines(proc: Proc) -> list[str]:
    return [
        json.loads(line)["loop"]
        for line in proc.output().splitlines()
        if line.startswith("{") and json.loads(line).get("event") == "event loop"
    ]


def test_choice_and_errors(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    assert loops.choose("asyncio") == "asyncio"
    assert loops.choose("auto") == ("uvloop" if HAS_UVLOOP else "asyncio")
    with pytest.raises(ConfigError, match="is not a loop"):
        loops.choose("trio")
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if it were not installed
    assert loops.choose("auto") == "asyncio"
    monkeypatch.setenv("DEFERRUN_LOOP", "uvloop")
    assert cli.main(["worker", "--db", "sqlite:///never-opened.db"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "uvloop is not installed" in err, err
    assert not Path("never-opened.db").exists()


def test_asyncio_forced(db_url: str, procs: Callable[..., Proc]) -> None:
    need_uvloop()
    proc = procs(["triggerer"], deferrun_env(db_url, DEFERRUN_LOOP="asyncio"))
    wait_until(lambda: loop_lines(proc), 20, message="event loop logged")
    assert loop_lines(proc) == ["asyncio"]


@pytest.mark.slow
def test_triggerer_and_worker_on_uvloop(db_url: str, procs: Callable[..., Proc]) -> None:
    need_uvloop()
    env = deferrun_env(db_url, DEFERRUN_LOOP="auto")
    worker = procs(["worker", "--slots", "8"], env)
    triggerer = procs(["triggerer"], env)
    wait_until(lambda: loop_lines(worker) and loop_lines(triggerer), 20, message="loops logged")
    assert loop_lines(worker) == ["uvloop"] and loop_lines(triggerer) == ["uvloop"]
    with Client(db=db_url) as client:
        from tests.support.hostile_userland import HostileDefer

        moment = time.time() + 3.0
        good = [
            client.submit(HostileDefer(kind="good_timer" if i % 2 else "good_run", at=moment))
            for i in range(8)
        ]
        bad = {
            "blocks": (2.0, "deferral timed out"),  # asyncio.timeout under uvloop
            "raise_system_exit": (None, "SystemExit: 3"),
            "background_exit": (None, "failed after a background SystemExit"),
        }
        bad_ids = {k: client.submit(HostileDefer(kind=k, timeout=t)) for k, (t, _) in bad.items()}
        every = [*good, *bad_ids.values()]
        wait_until(
            lambda: all(client.get(t).finished for t in every),
            timeout=30,
            message="every task finished",
        )
        for task_id in good:
            info = client.get(task_id)
            assert info.state is TaskState.SUCCESS, (info.state, info.error)
            assert -0.05 <= info.result["late"] <= 1.0, info.result
        for kind, task_id in bad_ids.items():
            info = client.get(task_id)
            assert info.state is TaskState.FAILED, (kind, info.state)
            assert bad[kind][1] in (info.error or ""), (kind, info.error)
    blamed = [
        json.loads(line)
        for line in triggerer.output().splitlines()
        if line.startswith("{") and "blocked the event loop" in line
    ]
    assert blamed and {b.get("task_id") for b in blamed} == {bad_ids["blocks"]}, blamed
    assert "background task stopped" in triggerer.output()
    for proc in (triggerer, worker):
        assert proc.popen.poll() is None, proc.output()[-3000:]
        proc.popen.send_signal(signal.SIGTERM)
        try:
            code = proc.popen.wait(15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"ignored SIGTERM under uvloop:\n{proc.output()[-3000:]}")
        assert code == 0, proc.output()[-3000:]


def test_time_triggers_never_fire_before_their_moment_on_uvloop(tmp_path: Path) -> None:
    """uvloop's timers count whole milliseconds and may wake a sleep up to 1 ms early; the
    built-in time triggers still never fire before their moment (README, uvloop)."""
    need_uvloop()
    import asyncio
    from datetime import UTC, datetime

    import anyio

    from deferrun.core.models import ClaimedTrigger
    from deferrun.core.serialization import dumps
    from deferrun.store import open_store
    from deferrun.triggerer.triggerer import Triggerer

    async def main() -> list[tuple[float, float]]:
        assert "uvloop" in type(asyncio.get_running_loop()).__module__
        store = await open_store(f"sqlite:///{tmp_path / 'timers.db'}")
        try:
            triggerer = Triggerer(store, dead_after=5.0)
            fired: dict[int, float] = {}
            triggerer.writer.put = lambda o: fired.setdefault(o.trigger_id, time.time())  # type: ignore[method-assign,assignment,return-value]
            start = time.time() + 0.3
            moments = {i + 1: start + i * 0.00037 for i in range(400)}  # not on whole ms
            for tid, at in moments.items():
                kwargs = dumps({"moment": datetime.fromtimestamp(at, UTC)})
                row = ClaimedTrigger(tid, f"t{tid}", "triggers.time.DateTimeTrigger", kwargs, None)
                triggerer._start(row)
            async with anyio.create_task_group() as tg:
                tg.start_soon(triggerer._timer_loop)
                with anyio.fail_after(20):
                    while len(fired) < len(moments):
                        await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
            return [(fired[tid], at) for tid, at in moments.items()]
        finally:
            await store.close()

    pairs = anyio.run(main, backend_options={"use_uvloop": True})
    early = [(round((at - f) * 1000, 3), at) for f, at in pairs if f < at]
    assert not early, early  # ms early, moment
