"""Hostile triggers against real ``deferrun triggerer`` and ``deferrun worker`` processes.

Every bad kind of trigger is deferred beside 20 good tasks due at one moment: the good ones
resume on time, each bad one fails its own task with a clear error, and the triggerer stops
cleanly on SIGTERM. A second test freezes a triggerer (SIGSTOP) until its triggers are
adopted, and checks every task resumed exactly once and the frozen one let go of them.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from deferrun import Client, TaskState
from tests.support.processes import Proc, deferrun_env, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GRACE = 8.0
GOOD = 20

# kind -> (defer timeout, text the task's error must contain)
BAD: dict[str, tuple[float | None, str]] = {
    "coroutine_run": (None, "is a plain coroutine (async def with no yield)"),
    "function_run": (None, "is not an async generator"),
    "sync_generator_run": (None, "is a sync generator"),
    "silent": (None, "returned without yielding an event"),
    "not_an_event": (None, "not a TriggerEvent"),
    "socket_payload": (None, "yielded an event that cannot be stored"),
    "oversized": (None, "over the limit of 1048576 bytes"),
    "raise_exception": (None, "RuntimeError: hostile trigger exploded"),
    "raise_system_exit": (None, "SystemExit: 3"),
    "raise_keyboard_interrupt": (None, "KeyboardInterrupt"),
    "raise_cancelled": (None, "raised CancelledError by itself"),
    "raise_generator_exit": (None, "GeneratorExit"),
    "blocks": (2.0, "deferral timed out"),
    "init_raises": (None, "InitRaises cannot be rebuilt"),
    "timer_raises": (None, "timer() raised"),
    "timer_nan": (None, "timer() must return None or (fire_at"),
    "timer_inf": (None, "timer() must return None or (fire_at"),
    "timer_str": (None, "timer() must return None or (fire_at"),
    "cleanup_raises": (1.5, "deferral timed out"),
    "cleanup_hangs": (1.5, "deferral timed out"),
    "background_exit": (None, "failed after a background SystemExit"),
    "init_bad_str": (None, "cannot load trigger"),
}
# placeholders whose stored row the test rewrites before the triggerer starts
TAMPERED: dict[str, tuple[dict[str, object], str]] = {
    # a module no --import names: refused before anything is imported, with the flag to add
    "unknown_classpath": ({"classpath": "no_such_module.Trigger"}, "--import no_such_module"),
    "forged_classpath": (
        {"classpath": "os.system", "kwargs": '{"command": "touch pwned"}'},
        "is not a BaseTrigger subclass",
    ),
    "kwargs_do_not_fit": ({"kwargs": '{"no_such_argument": 1}'}, "do not fit"),
    "kwargs_wrong_type": ({"kwargs": "[1, 2, 3]"}, "not an object"),
    "deadline_wrong_type": ({"deadline": "inf"}, "stored deadline that is not a time"),
}


def tamper(db_url: str, task_id: str, changes: dict[str, object]) -> None:
    """Rewrite a stored trigger row as a hostile or corrupted writer would."""
    if db_url.startswith("sqlite"):
        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as conn:
            for column, value in changes.items():
                stored = float(value) if column == "deadline" else value
                conn.execute(
                    f"UPDATE deferrun_triggers SET {column} = ? WHERE task_id = ?",
                    (stored, task_id),
                )
        return

    async def run() -> None:
        import asyncpg

        conn = await asyncpg.connect(db_url)
        try:
            for column, value in changes.items():
                # PostgreSQL stores a float: give it NaN, which no clock comparison can use
                stored = float("nan") if column == "deadline" else value
                await conn.execute(
                    f"UPDATE deferrun_triggers SET {column} = $1 WHERE task_id = $2",
                    stored,
                    task_id,
                )
        finally:
            await conn.close()

    anyio.run(run)


def states(client: Client, ids: list[str]) -> dict[str, TaskState]:
    return {t: client.get(t).state for t in ids}


def test_hostile_triggers_fail_alone_and_good_ones_resume_on_time(
    db_url: str, procs: Callable[..., Proc], tmp_path: Path
) -> None:
    env = deferrun_env(
        db_url,
        DEFERRUN_TRIGGER_CLEANUP_TIMEOUT="1",
        DEFERRUN_TRIGGERER_GRACE_PERIOD=str(GRACE),
        # "os" trusted too: the forged os.system row is refused for what it names (not a
        # BaseTrigger), not only because its module is not trusted
        DEFERRUN_IMPORTS="tests.support,os",
    )
    worker = procs(["worker", "--slots", "8"], env)
    with Client(db=db_url) as client:
        from tests.support.hostile_userland import HostileDefer

        moment = time.time() + 9.0
        good = [
            client.submit(HostileDefer(kind="good_timer" if i % 2 else "good_run", at=moment))
            for i in range(GOOD)
        ]
        bad = {
            kind: client.submit(HostileDefer(kind=kind, timeout=t)) for kind, (t, _) in BAD.items()
        }
        tampered = {kind: client.submit(HostileDefer(kind="placeholder")) for kind in TAMPERED}
        # running at SIGTERM: its cleanup() never returns and swallows every cancellation
        lingering = client.submit(HostileDefer(kind="cleanup_ignores_cancel"))
        every = [*good, *bad.values(), *tampered.values(), lingering]
        wait_until(
            lambda: all(s is TaskState.DEFERRED for s in states(client, every).values()),
            timeout=30,
            message="every task deferred",
        )
        for kind, (changes, _) in TAMPERED.items():
            tamper(db_url, tampered[kind], changes)
        blocker_trigger = client.get(bad["blocks"]).trigger_id
        assert time.time() < moment - 3, "setup too slow for the timing checks"
        triggerer = procs(["triggerer"], env)

        names = {**{t: "good" for t in good}, **{t: k for k, t in bad.items()}}
        names.update({t: k for k, t in tampered.items()})
        try:
            wait_until(
                lambda: all(client.get(t).finished for t in names),
                timeout=30,
                message="every good and bad task finished",
            )
        except AssertionError:
            left = {names[t]: client.get(t).state for t in names if not client.get(t).finished}
            raise AssertionError(f"unfinished: {left}\n{triggerer.output()[-4000:]}") from None
        for kind, task_id in bad.items():
            info = client.get(task_id)
            assert info.state is TaskState.FAILED, (kind, info.state, info.error)
            assert BAD[kind][1] in (info.error or ""), (kind, info.error)
        for kind, task_id in tampered.items():
            info = client.get(task_id)
            assert info.state is TaskState.FAILED, (kind, info.state, info.error)
            assert TAMPERED[kind][1] in (info.error or ""), (kind, info.error)
        lateness = []
        for task_id in good:
            info = client.get(task_id)
            assert info.state is TaskState.SUCCESS, (info.state, info.error)
            lateness.append(info.result["late"])
        assert max(lateness) <= 1.0 and min(lateness) >= -0.05, lateness
        assert not (tmp_path / "pwned").exists()
        assert client.get(lingering).state is TaskState.DEFERRED

    log = triggerer.output()
    blamed = [
        json.loads(line)
        for line in log.splitlines()
        if line.startswith("{") and "blocked the event loop" in line
    ]
    assert blamed and {b.get("trigger_id") for b in blamed} == {blocker_trigger}, blamed
    started = time.monotonic()
    triggerer.popen.send_signal(signal.SIGTERM)
    try:
        code = triggerer.popen.wait(GRACE + 5)
    except subprocess.TimeoutExpired:
        pytest.fail(f"triggerer ignored SIGTERM:\n{triggerer.output()[-3000:]}")
    took = time.monotonic() - started
    assert code == 0 and took < GRACE, (code, took, triggerer.output()[-3000:])
    assert "cleanup() took longer than 1s; abandoned" in triggerer.output()
    assert worker.popen.poll() is None


def test_sigstopped_triggerer_is_adopted_and_lets_go(
    db_url: str, procs: Callable[..., Proc], tmp_path: Path
) -> None:
    """Freeze a triggerer past DEFERRUN_DEAD_AFTER: a second one adopts its triggers; once
    thawed, the first notices and stops running them; each task resumes exactly once."""
    record = tmp_path / "resumes.log"
    env = deferrun_env(db_url, dead_after="2")
    first = procs(["triggerer"], env)
    procs(["worker", "--slots", "8"], env)
    with Client(db=db_url) as client:
        from tests.support.hostile_userland import HostileDefer

        wait_until(lambda: "triggerer started" in first.output(), 20, message="first triggerer")
        moment = time.time() + 12.0
        ids = [
            client.submit(
                HostileDefer(
                    kind="good_run" if i % 2 else "good_timer", at=moment, record=str(record)
                )
            )
            for i in range(20)
        ]
        wait_until(
            lambda: all(t.triggerer_id for t in client.triggers()) and len(client.triggers()) == 20,
            timeout=20,
            message="first triggerer owns all 20 triggers",
        )
        first.kill(signal.SIGSTOP)
        try:
            second = procs(["triggerer"], env)
            wait_until(
                lambda: (
                    {t.triggerer_id for t in client.triggers()} - {None}
                    and all("triggerer-" in (t.triggerer_id or "") for t in client.triggers())
                    and first_id(first) not in {t.triggerer_id for t in client.triggers()}
                ),
                timeout=20,
                message="second triggerer adopts every trigger",
            )
        finally:
            first.kill(signal.SIGCONT)
        wait_until(  # its reconcile runs every 5 s; a loaded CI machine needed more than 15
            lambda: first.output().count("trigger no longer assigned here") >= 10,
            timeout=30,
            message="the thawed triggerer lets go of its run() triggers",
        )
        wait_until(
            lambda: all(client.get(t).state is TaskState.SUCCESS for t in ids),
            timeout=30,
            message="every task resumed",
        )
        counts = Counter(line.split()[0] for line in record.read_text().splitlines())
        assert counts == Counter(dict.fromkeys(ids, 1)), counts
    assert second.popen.poll() is None and first.popen.poll() is None


def first_id(proc: Proc) -> str:
    for line in proc.output().splitlines():
        if "triggerer started" in line:
            return str(json.loads(line)["triggerer_id"])
    raise AssertionError("no 'triggerer started' line")
