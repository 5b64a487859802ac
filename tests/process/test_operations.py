"""Operating deferrun: metrics, health, per-task logs, graceful shutdown (real processes)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from deferrun import Client, TaskState
from tests.support.pgcluster import PgCluster, free_port
from tests.support.processes import Proc, deferrun_env, wait_until
from tests.support.runtime import install_user_module

pytestmark = pytest.mark.e2e

USER_MODULE = '''
import time
from datetime import datetime, timezone
from typing import Any

import anyio

from deferrun import BaseOperator, BaseTrigger, TriggerEvent


class MomentTrigger(BaseTrigger):
    """Fires at epoch ``at``; logs while waiting; records cleanup() in ``marker``."""

    def __init__(self, at: float, marker: str) -> None:
        self.at = at
        self.marker = marker

    async def run(self):
        self.log.info("trigger waiting", seconds=round(self.at - time.time(), 2))
        await anyio.sleep(max(0.0, self.at - time.time()))
        yield TriggerEvent({"fired": time.time()})

    async def cleanup(self):
        with open(self.marker, "a") as f:
            f.write(f"{self.trigger_id}\\n")


class WaitUntil(BaseOperator):
    def __init__(self, *, at: float, marker: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.at = at
        self.marker = marker

    def execute(self, context):
        self.log.info("operator deferring", at=self.at)
        self.defer(trigger=MomentTrigger(at=self.at, marker=self.marker), method_name="done")

    def done(self, context, event=None):
        self.log.info("operator resumed", lateness=round(time.time() - self.at, 3))
        return time.time() - self.at


class Sleepy(BaseOperator):
    def __init__(self, *, seconds: float, marker: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seconds = seconds
        self.marker = marker

    def execute(self, context):
        with open(self.marker, "a") as f:
            f.write(f"start {context['try_number']}\\n")
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline:   # plain Python, so it can be interrupted
            time.sleep(0.05)
        with open(self.marker, "a") as f:
            f.write("end\\n")
        return "slept"
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return install_user_module(tmp_path, monkeypatch, "ops_ops", USER_MODULE)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError:
        return 0, ""


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def started(p: Proc) -> bool:
    return "started" in p.output()


def test_metrics_and_health_with_50_deferred(
    sqlite_url: str, user_module: Path, procs: Callable[..., Proc], tmp_path: Path
) -> None:
    from ops_ops import WaitUntil

    env = deferrun_env(sqlite_url, user_module, DEFERRUN_IMPORTS="tests.support,ops_ops")
    tport, wport = free_port(), free_port()
    triggerer = procs(
        ["triggerer", "--metrics-port", str(tport), "--metrics-host", "127.0.0.1"], env
    )
    worker = procs(["worker", "--metrics-port", str(wport), "--metrics-host", "127.0.0.1"], env)
    for p in (triggerer, worker):
        wait_until(lambda p=p: started(p), 20, message="processes to start")
    marker = tmp_path / "cleanup.txt"
    with Client(sqlite_url) as client:
        for _ in range(50):
            client.submit(WaitUntil(at=time.time() + 3600, marker=str(marker)))
    tmetrics = f"http://127.0.0.1:{tport}/metrics"
    wait_until(
        lambda: metric(get(tmetrics)[1], "deferrun_triggers_running") == 50,
        20,
        message="50 triggers running",
    )
    status, text = get(tmetrics)
    assert status == 200
    assert metric(text, "deferrun_triggerer_capacity_left") == 950
    assert metric(text, "deferrun_trigger_events_total") == 0
    for name in (
        "deferrun_trigger_failures_total",
        "deferrun_trigger_timeouts_total",
        "deferrun_loop_blocked_total",
        "deferrun_loop_lag_seconds_count",
    ):
        assert metric(text, name) is not None, name

    status, wtext = get(f"http://127.0.0.1:{wport}/metrics")
    assert status == 200
    assert 'deferrun_tasks_total{state="deferred"} 50.0' in wtext
    assert metric(wtext, "deferrun_worker_slots_busy") == 0
    assert metric(wtext, "deferrun_worker_slots") == 8

    for port in (tport, wport):
        status, body = get(f"http://127.0.0.1:{port}/healthz")
        assert status == 200, body
        assert json.loads(body)["status"] == "ok"


@pytest.mark.slow
def test_healthz_reports_a_lost_database(
    pg_cluster: PgCluster, pg_url: str, procs: Callable[..., Proc]
) -> None:
    env = deferrun_env(pg_url, dead_after="2")
    port = free_port()
    triggerer = procs(
        ["triggerer", "--metrics-port", str(port), "--metrics-host", "127.0.0.1"], env
    )
    wait_until(lambda: started(triggerer), 20, message="triggerer to start")
    health = f"http://127.0.0.1:{port}/healthz"
    wait_until(lambda: get(health)[0] == 200, 10, message="healthy")
    pg_cluster.stop("fast")
    try:
        wait_until(lambda: get(health)[0] == 503, 15, message="unhealthy while the DB is down")
        assert json.loads(get(health)[1])["status"] == "unhealthy"
    finally:
        pg_cluster.start()
    wait_until(lambda: get(health)[0] == 200, 20, message="healthy again")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_sigterm_triggerer_hands_its_triggers_over(
    backend: str,
    request: pytest.FixtureRequest,
    user_module: Path,
    procs: Callable[..., Proc],
    tmp_path: Path,
) -> None:
    from ops_ops import WaitUntil

    url = (
        request.getfixturevalue("sqlite_url")
        if backend == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    # A long dead-after proves the hand-over does not wait for the dead-triggerer timeout.
    env = deferrun_env(url, user_module, dead_after="60", DEFERRUN_IMPORTS="tests.support,ops_ops")
    first = procs(["triggerer"], env)
    worker = procs(["worker"], env)
    for p in (first, worker):
        wait_until(lambda p=p: started(p), 20, message="processes to start")
    marker = tmp_path / "cleanup.txt"
    base = time.time() + 6.0
    with Client(url) as client:
        ids = [client.submit(WaitUntil(at=base + i * 0.01, marker=str(marker))) for i in range(50)]
        wait_until(
            lambda: all(client.get(i).state is TaskState.DEFERRED for i in ids),
            20,
            message="50 deferred",
        )
        # SIGTERM with all 50 live: each must then run cleanup() and be handed over.
        wait_until(
            lambda: first.output().count("trigger waiting") >= 50,
            20,
            message="all 50 triggers running",
        )
        first.popen.send_signal(signal.SIGTERM)
        assert first.popen.wait(15) == 0
        assert len(marker.read_text().split()) == 50  # every trigger ran cleanup()
        procs(["triggerer"], env)
        infos = [client.wait(i, timeout=30) for i in ids]
    assert [i.state for i in infos] == [TaskState.SUCCESS] * 50, {i.error for i in infos}
    assert max(i.result for i in infos) < 3.0  # resumed within a few seconds of the moment


@pytest.mark.slow
def test_task_logs_show_worker_and_trigger_lines(
    sqlite_url: str, user_module: Path, procs: Callable[..., Proc], tmp_path: Path
) -> None:
    from ops_ops import WaitUntil

    env = deferrun_env(sqlite_url, user_module, DEFERRUN_IMPORTS="tests.support,ops_ops")
    procs(["triggerer"], env)
    procs(["worker"], env)
    with Client(sqlite_url) as client:
        task_id = client.submit(WaitUntil(at=time.time() + 1.0, marker=str(tmp_path / "m")))
        info = client.wait(task_id, timeout=30)
    assert info.state is TaskState.SUCCESS

    def logs() -> str:
        done = subprocess.run(
            [sys.executable, "-m", "deferrun", "logs", task_id],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    wait_until(lambda: "operator resumed" in logs(), 10, message="the resume line stored")
    lines = logs().splitlines()
    order = [
        "operator deferring",
        "task deferred",
        "trigger waiting",
        "trigger fired",
        "operator resumed",
        "task succeeded",
    ]
    positions = [next(n for n, line in enumerate(lines) if what in line) for what in order]
    assert positions == sorted(positions), lines
    assert any(" trigger " in f" {line} " and "trigger waiting" in line for line in lines)
    assert any("worker" in line and "operator deferring" in line for line in lines)


@pytest.mark.slow
def test_worker_sigterm_finishes_or_requeues(
    sqlite_url: str, user_module: Path, procs: Callable[..., Proc], tmp_path: Path
) -> None:
    from ops_ops import Sleepy

    env = deferrun_env(sqlite_url, user_module, DEFERRUN_IMPORTS="tests.support,ops_ops")
    marker_short, marker_long = tmp_path / "short", tmp_path / "long"
    worker = procs(["worker", "--grace-period", "2"], env)
    wait_until(lambda: started(worker), 20, message="worker to start")
    with Client(sqlite_url) as client:
        short = client.submit(Sleepy(seconds=1.0, marker=str(marker_short)))
        long = client.submit(Sleepy(seconds=30.0, marker=str(marker_long)))
        wait_until(
            lambda: marker_short.exists() and marker_long.exists(),
            20,
            message="both tasks to start",
        )
        worker.popen.send_signal(signal.SIGTERM)
        assert worker.popen.wait(20) == 0
        assert client.get(short).state is TaskState.SUCCESS  # finished within the grace
        requeued = client.get(long)
        assert requeued.state is TaskState.QUEUED and requeued.try_number == 1
        second = procs(["worker"], env)
        wait_until(lambda: started(second), 20, message="second worker")
        wait_until(
            lambda: marker_long.read_text().count("start") == 2,
            20,
            message="the re-queued task to run again",
        )
        assert client.get(long).try_number == 1  # a re-queue is not a failed try


def test_second_signal_exits_at_once(
    sqlite_url: str, user_module: Path, procs: Callable[..., Proc], tmp_path: Path
) -> None:
    from ops_ops import Sleepy

    env = deferrun_env(sqlite_url, user_module, DEFERRUN_IMPORTS="tests.support,ops_ops")
    worker = procs(["worker", "--grace-period", "60"], env)
    wait_until(lambda: started(worker), 20, message="worker to start")
    marker = tmp_path / "m"
    with Client(sqlite_url) as client:
        client.submit(Sleepy(seconds=60.0, marker=str(marker)))
    wait_until(marker.exists, 20, message="the task to start")
    worker.popen.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert worker.popen.poll() is None  # still draining
    t0 = time.monotonic()
    worker.popen.send_signal(signal.SIGTERM)
    assert worker.popen.wait(5) == 130
    assert time.monotonic() - t0 < 3
