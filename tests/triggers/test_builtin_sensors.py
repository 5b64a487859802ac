"""Built-in sensors in all three modes, RunJobOperator, and secrets staying secret."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from deferrun import Client, TaskState
from deferrun.operators import RunJobOperator
from deferrun.sensors import HttpSensor, JobRunSensor, S3KeySensor, SqlSensor
from deferrun.store import Store
from tests.support.processes import Proc, deferrun_env, wait_until
from tests.support.runtime import runtime_for
from tests.support.services import PASSWORD, FakeServices, Moto

MODES = ["poke", "reschedule", "deferrable"]


@pytest.fixture
def conns(moto: Moto, services: FakeServices, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEFERRUN_CONN_AWS_DEFAULT", moto.uri())
    monkeypatch.setenv("DEFERRUN_CONN_HTTP_DEFAULT", services.uri())
    monkeypatch.setenv("DEFERRUN_CONN_JOBS", services.uri())


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_s3_and_http_sensors(
    store: Store, conns: None, moto: Moto, services: FakeServices, mode: str
) -> None:
    bucket = f"sensors-{uuid.uuid4().hex[:8]}"
    s3 = moto.boto("s3")
    s3.create_bucket(Bucket=bucket)
    name = uuid.uuid4().hex
    async with runtime_for(store, slots=2) as rt:
        s3_id = await rt.client.submit(
            S3KeySensor(
                bucket_name=bucket,
                bucket_key="in/*.csv",
                wildcard_match=True,
                mode=mode,
                poke_interval=0.1,
                timeout=30,
            )
        )
        http_id = await rt.client.submit(
            HttpSensor(endpoint=f"health/{name}", mode=mode, poke_interval=0.1, timeout=30)
        )
        await anyio.sleep(0.5)
        assert not (await rt.client.get(s3_id)).finished
        await anyio.to_thread.run_sync(
            lambda: s3.put_object(Bucket=bucket, Key="in/a.csv", Body=b"1")
        )
        services.ready[name] = {"state": "up"}
        s3_info = await rt.client.wait(s3_id, timeout=20)
        http_info = await rt.client.wait(http_id, timeout=20)
    assert s3_info.state is TaskState.SUCCESS, s3_info.error
    assert s3_info.result == {"status": "success", "keys": ["in/a.csv"]}
    assert http_info.state is TaskState.SUCCESS, http_info.error
    assert http_info.result["body"] == {"name": name, "state": "up"}


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_sql_sensor(
    store: Store, pg_url: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncpg

    monkeypatch.setenv("DEFERRUN_CONN_WAREHOUSE", pg_url)
    conn = await asyncpg.connect(pg_url)
    await conn.execute("CREATE TABLE IF NOT EXISTS marks (name text)")
    try:
        async with runtime_for(store) as rt:
            task_id = await rt.client.submit(
                SqlSensor(
                    sql="SELECT count(*) > 0 FROM marks WHERE name = $1",
                    parameters=[mode],
                    conn_id="warehouse",
                    mode=mode,
                    poke_interval=0.1,
                    timeout=30,
                )
            )
            await anyio.sleep(0.4)
            assert not (await rt.client.get(task_id)).finished
            await conn.execute("INSERT INTO marks VALUES ($1)", mode)
            info = await rt.client.wait(task_id, timeout=20)
    finally:
        await conn.close()
    assert info.state is TaskState.SUCCESS, info.error
    assert info.result == {"?column?": True}


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_job_run_sensor_fails_the_task_when_the_run_fails(
    store: Store, conns: None, services: FakeServices, mode: str
) -> None:
    from tests.support import services as svc

    good, bad = f"run-g-{mode}", f"run-b-{mode}"
    services.runs[good] = svc.Run(id=good, outcome="success", polls_to_finish=2)
    services.runs[bad] = svc.Run(id=bad, outcome="failed", polls_to_finish=2)
    common = {
        "http_conn_id": "jobs",
        "status_field": "state.life_cycle",
        "mode": mode,
        "poke_interval": 0.05,
        "timeout": 30,
    }
    async with runtime_for(store) as rt:
        ok = await rt.run_to_end(JobRunSensor(status_endpoint=f"api/runs/{good}", **common))
        failed = await rt.run_to_end(JobRunSensor(status_endpoint=f"api/runs/{bad}", **common))
    assert ok.state is TaskState.SUCCESS and ok.result["state"]["life_cycle"] == "SUCCESS"
    assert failed.state is TaskState.FAILED
    assert "ended in state 'FAILED': division by zero in model orders" in (failed.error or "")


# --------------------------------------------------------------------------- real processes


@pytest.mark.slow
def test_run_job_operator_end_to_end_and_secrets_stay_secret(
    sqlite_url: str,
    services: FakeServices,
    moto: Moto,
    procs: Callable[..., Proc],
    tmp_path: Path,
) -> None:
    env = deferrun_env(sqlite_url)
    env["DEFERRUN_CONN_JOBS"] = services.uri()
    env["DEFERRUN_CONN_AWS_DEFAULT"] = moto.uri()
    bucket = f"e2e-{uuid.uuid4().hex[:8]}"
    moto.boto("s3").create_bucket(Bucket=bucket)
    triggerer = procs(["triggerer"], env)
    worker = procs(["worker", "--slots", "4"], env)
    common = {
        "http_conn_id": "jobs",
        "submit_endpoint": "api/runs",
        "status_endpoint": "api/runs/{run_id}",
        "run_id_field": "data.id",
        "status_field": "state.life_cycle",
        "poll_interval": 0.1,
    }
    with Client(sqlite_url) as client:
        ok_id = client.submit(
            RunJobOperator(submit_json={"outcome": "success", "polls": 3}, **common)
        )
        bad_id = client.submit(RunJobOperator(submit_json={"outcome": "failed"}, **common))
        s3_id = client.submit(
            S3KeySensor(
                bucket_name=bucket, bucket_key="x.csv", mode="deferrable", poke_interval=0.1
            )
        )
        wait_until(
            lambda: client.get(s3_id).state is TaskState.DEFERRED,
            20,
            message="the S3 sensor to defer",
        )
        moto.boto("s3").put_object(Bucket=bucket, Key="x.csv", Body=b"1")
        ok = client.wait(ok_id, timeout=30)
        bad = client.wait(bad_id, timeout=30)
        s3_info = client.wait(s3_id, timeout=30)
    assert ok.state is TaskState.SUCCESS, ok.error
    assert ok.result["state"]["life_cycle"] == "SUCCESS" and ok.result["id"].startswith("run-")
    assert bad.state is TaskState.FAILED
    assert "ended in state 'FAILED': division by zero in model orders" in (bad.error or "")
    assert s3_info.state is TaskState.SUCCESS

    logs = subprocess.run(
        [sys.executable, "-m", "deferrun", "logs", ok_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert "job run started" in logs
    # No secret in the database file (and its WAL), the process logs, or any event/result.
    triggerer.stop()
    worker.stop()
    db_path = Path(sqlite_url.removeprefix("sqlite:///"))
    stored = b"".join(p.read_bytes() for p in db_path.parent.glob(db_path.name + "*"))
    outputs = triggerer.output() + worker.output()
    for secret in (PASSWORD, moto.secret):
        assert secret.encode() not in stored
        assert secret not in outputs
        assert secret not in str([ok.result, bad.error, s3_info.result])


def test_auth_failure_in_run_job_operator_fails_without_retry(
    sqlite_url: str,
    services: FakeServices,
    procs: Callable[..., Proc],
) -> None:
    env = deferrun_env(sqlite_url)
    env["DEFERRUN_CONN_JOBS"] = services.uri(password="not-the-password")
    procs(["worker"], env)
    with Client(sqlite_url) as client:
        task_id = client.submit(
            RunJobOperator(
                http_conn_id="jobs",
                submit_endpoint="api/runs",
                status_endpoint="api/runs/{run_id}",
                retries=3,
                retry_delay=0,
            )
        )
        info = client.wait(task_id, timeout=30)
    assert info.state is TaskState.FAILED and info.try_number == 1
    assert "HTTP 401 unauthorized" in (info.error or "")
    assert "not-the-password" not in (info.error or "")
