"""Airflow-style code end to end: real worker and triggerer processes, both backends, a
dbt Cloud-shaped service with token auth; the processes trust only
``tests.support.airflow_style``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from deferrun import Client, TaskState
from tests.cli.test_cli import _create_database
from tests.support.airflow_style import (
    DbtCloudRunJobOperator,
    DeferBadTrigger,
    DeferToEnd,
    FlagSensor,
    KillMe,
    Priority,
    PushThenFail,
    ReportRun,
    WaitThenRun,
)
from tests.support.dbt_cloud import ACCOUNT, FakeDbtCloud
from tests.support.dbt_cloud import DBT_TOKEN as TOKEN
from tests.support.processes import Proc, deferrun_env, wait_until

pytestmark = pytest.mark.e2e


def _start(db_url: str, dbt: FakeDbtCloud, procs: Callable[..., Proc]) -> None:
    env = deferrun_env(
        db_url,
        DEFERRUN_CONN_DBT_CLOUD_DEFAULT=dbt.airflow_uri(),
        DEFERRUN_IMPORTS="tests.support.airflow_style",
    )
    anyio.run(_create_database, db_url)
    procs(["triggerer"], env)
    procs(["worker", "--slots", "4"], env)


@pytest.mark.slow
def test_deferrable_run_job_operator_and_xcom_downstream(
    db_url: str, tmp_path: Path, dbt: FakeDbtCloud, procs: Callable[..., Proc]
) -> None:
    marker = tmp_path / "runs.txt"
    _start(db_url, dbt, procs)
    refused_before = dbt.refused
    with Client(db_url) as client:
        run = client.submit(
            DbtCloudRunJobOperator(
                task_id="dbt_run", job_id=5, marker=str(marker), dag="nightly", retries=2
            )
        )
        report = client.submit(
            ReportRun(
                task_id="report",
                upstream_task="dbt_run",
                owner="data-eng",
                pool="dbt",
                params={"full_refresh": True},
            ),
            after=[run],
        )
        errored = client.submit(DbtCloudRunJobOperator(task_id="err", job_id=20))
        cancelled = client.submit(
            DbtCloudRunJobOperator(task_id="cxl", job_id=30, retries=2, retry_delay=0)
        )
        run_info = client.wait(run, timeout=60)
        report_info = client.wait(report, timeout=60)
        err_info = client.wait(errored, timeout=60)
        cxl_info = client.wait(cancelled, timeout=60)

    assert run_info.state is TaskState.SUCCESS, run_info.error
    run_id = run_info.result
    assert run_id in dbt.runs and marker.read_text().split() == [str(run_id)]  # started once
    cause = dbt.runs[run_id]["cause"]
    assert "'dbt_run' in the nightly DAG (try 1" in cause
    assert dbt.refused == refused_before  # every call carried "Authorization: Token <password>"
    assert dbt.requests[f"GET /api/v2/accounts/{ACCOUNT}/runs/{run_id}/"] == dbt.polls + 1

    assert report_info.state is TaskState.SUCCESS, report_info.error
    result = report_info.result
    assert result["run_id"] == run_id  # the upstream's return_value
    assert result["url"] == f"https://cloud.example/#/runs/{run_id}"  # pushed in execute
    assert result["priority"] is Priority.HIGH  # pushed in execute_complete; Enum kept
    seen = result["seen_start"]  # execute_complete pulled its own execute's value
    assert isinstance(seen, list) and seen[0].startswith(run_info.created_at.strftime("%Y-%m-%d"))
    assert result["missing"] == "fallback"
    assert result["ds"] == report_info.created_at.strftime("%Y-%m-%d")
    assert result["run_after_is_logical"] is True
    assert (result["dag_id"], result["owner"], result["pool"]) == ("deferrun", "data-eng", "dbt")
    assert result["params"] == {"full_refresh": True} and result["try_number"] == 1

    assert err_info.state is TaskState.FAILED and "has error" in (err_info.error or "")
    # AirflowFailException: failed without using its two retries
    assert cxl_info.state is TaskState.FAILED and cxl_info.try_number == 1
    assert "has been cancelled" in (cxl_info.error or "")
    assert TOKEN not in (err_info.error or "") + (cxl_info.error or "")


def test_defer_error_at_the_call_and_start_trigger_args(
    db_url: str, tmp_path: Path, dbt: FakeDbtCloud, procs: Callable[..., Proc]
) -> None:
    marker = tmp_path / "bad.txt"
    _start(db_url, dbt, procs)
    with Client(db_url) as client:
        bad = client.submit(DeferBadTrigger(task_id="bad", marker=str(marker), retries=2))
        waits = client.submit(WaitThenRun(task_id="waits"))
        ends = client.submit(DeferToEnd(task_id="ends"))
        retried = client.submit(PushThenFail(task_id="retried", retries=1, retry_delay=0))
        retried_info = client.wait(retried, timeout=60)
        ended = client.wait(ends, timeout=60)
        info = client.wait(bad, timeout=60)
        waited = client.wait(waits, timeout=60)
    assert waited.state is TaskState.SUCCESS, waited.error
    # TaskSuccessEvent(xcoms={"return_value": ...}) ends the task with that result
    assert ended.state is TaskState.SUCCESS and ended.result == {"rows": 3}, ended.error
    assert retried_info.result == {"try": 2, "seen": "none"}, retried_info.error
    assert waited.result == {"tag": "from-start-args", "fired": True, "try": 1}
    assert info.state is TaskState.FAILED and info.try_number == 1
    assert "TaskDeferralError" in (info.error or "") and "NotStorable" in (info.error or "")
    assert marker.read_text() == "started\nundone: TaskDeferralError\n"


@pytest.mark.slow
def test_sensors_map_airflow_outcomes(
    db_url: str, tmp_path: Path, dbt: FakeDbtCloud, procs: Callable[..., Proc]
) -> None:
    flag = tmp_path / "flag"
    flag.write_text("ready-42")
    _start(db_url, dbt, procs)
    quick = {"poke_interval": 0.05, "timeout": 1, "retries": 2, "retry_delay": 0}
    with Client(db_url) as client:
        ids = {
            "done": client.submit(FlagSensor(task_id="done", path=str(flag), **quick)),
            "skip": client.submit(FlagSensor(task_id="skip", path="x", fail_with="skip", **quick)),
            "fail": client.submit(FlagSensor(task_id="fail", path="x", fail_with="fail", **quick)),
            "soft": client.submit(
                FlagSensor(task_id="soft", path=str(tmp_path / "never"), soft_fail=True, **quick)
            ),
            "silent": client.submit(
                FlagSensor(task_id="silent", path="x", fail_with="boom", silent_fail=True, **quick)
            ),
            "loud": client.submit(FlagSensor(task_id="loud", path="x", fail_with="boom", **quick)),
        }
        got = {name: client.wait(task, timeout=60) for name, task in ids.items()}
    assert got["done"].state is TaskState.SUCCESS and got["done"].result == "ready-42"
    assert got["skip"].state is TaskState.SKIPPED
    assert got["fail"].state is TaskState.FAILED and got["fail"].try_number == 1
    assert got["soft"].state is TaskState.SKIPPED and "timed out" in (got["soft"].error or "")
    # silent_fail: the error counts as "not yet", so the sensor times out, without retries
    assert got["silent"].state is TaskState.FAILED and got["silent"].try_number == 1
    assert "AirflowSensorTimeout" in (got["silent"].error or "")
    # an ordinary error in poke uses the task's retries, as in Airflow
    assert got["loud"].state is TaskState.FAILED and got["loud"].try_number == 3


@pytest.mark.slow
def test_on_kill_runs_on_user_cancel_only(
    db_url: str, tmp_path: Path, dbt: FakeDbtCloud, procs: Callable[..., Proc]
) -> None:
    cancelled, timed_out = tmp_path / "cancelled.txt", tmp_path / "timed_out.txt"
    _start(db_url, dbt, procs)
    with Client(db_url) as client:
        victim = client.submit(KillMe(task_id="victim", marker=str(cancelled)))
        slow = client.submit(KillMe(task_id="slow", marker=str(timed_out), execution_timeout=0.5))
        wait_until(lambda: cancelled.exists(), 30, message="the task to start")
        client.cancel(victim)
        wait_until(
            lambda: "killed" in cancelled.read_text(), 30, message="on_kill after the cancel"
        )
        slow_info = client.wait(slow, timeout=60)
    assert cancelled.read_text() == "started\nkilled\n"
    assert slow_info.state is TaskState.FAILED and "execution_timeout" in (slow_info.error or "")
    assert timed_out.read_text() == "started\n"  # a timeout is not a kill
