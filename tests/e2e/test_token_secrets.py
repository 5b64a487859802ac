"""Real deferrun processes: tokens and AWS secret keys never stored or logged, and a dbt Cloud
run survives a SIGKILLed triggerer (failover never cancels it)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from deferrun import Client, TaskState
from deferrun.aws_sensors import EmrJobFlowSensor, SqsSensor
from deferrun.operators import DbtCloudRunJobOperator
from tests.support.dbt_cloud import ACCOUNT, DBT_TOKEN, FakeDbtCloud
from tests.support.processes import Proc, deferrun_env, wait_until
from tests.support.services import Moto

HEADER_KEY = "hdr-Secret-5150"


def op(job_id: int, conn_id: str = "dbt_cloud_default") -> DbtCloudRunJobOperator:
    return DbtCloudRunJobOperator(
        job_id=job_id, account_id=ACCOUNT, conn_id=conn_id, check_interval=0.1, timeout=60
    )


def test_secrets_absent_from_db_logs_errors_and_events(
    sqlite_url: str, dbt: FakeDbtCloud, moto: Moto, procs: Callable[..., Proc]
) -> None:
    env = deferrun_env(sqlite_url)
    env["DEFERRUN_CONN_DBT_CLOUD_DEFAULT"] = dbt.uri(extra=f"header.X-Api-Key={HEADER_KEY}")
    env["DEFERRUN_CONN_WRONG_SCHEME"] = dbt.uri(auth="bearer")
    env["DEFERRUN_CONN_AWS_DEFAULT"] = moto.uri()
    queue = moto.boto("sqs").create_queue(QueueName=f"s-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    triggerer = procs(["triggerer"], env)
    worker = procs(["worker", "--slots", "4"], env)
    with Client(sqlite_url) as client:
        ok_id = client.submit(op(110))
        error_id = client.submit(op(120))
        denied_id = client.submit(op(110, conn_id="wrong_scheme"))
        sqs_id = client.submit(SqsSensor(sqs_queue=queue, mode="deferrable", timeout=60))
        emr_id = client.submit(
            EmrJobFlowSensor(job_flow_id="j-NOSUCHCLUSTER", mode="deferrable", poke_interval=0.1)
        )
        wait_until(lambda: client.get(sqs_id).state is TaskState.DEFERRED, 20, message="defer")
        moto.boto("sqs").send_message(QueueUrl=queue, MessageBody='{"hello": "world"}')
        infos = {t: client.wait(t, timeout=60) for t in (ok_id, error_id, denied_id, sqs_id)}
        emr = client.wait(emr_id, timeout=60)
    assert infos[ok_id].state is TaskState.SUCCESS, infos[ok_id].error
    assert infos[sqs_id].state is TaskState.SUCCESS, infos[sqs_id].error
    assert infos[error_id].state is TaskState.FAILED
    assert "HTTP 401" in (infos[denied_id].error or "")
    assert "Bearer ***" in (infos[denied_id].error or "")
    assert emr.state is TaskState.FAILED  # an AWS error, with the request signed by the key
    logs = subprocess.run(
        [sys.executable, "-m", "deferrun", "logs", ok_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert "dbt Cloud run started" in logs
    triggerer.stop()
    worker.stop()
    db_path = Path(sqlite_url.removeprefix("sqlite:///"))
    stored = b"".join(p.read_bytes() for p in db_path.parent.glob(db_path.name + "*"))
    outputs = triggerer.output() + worker.output() + logs
    seen = str([(i.result, i.error) for i in [*infos.values(), emr]])
    for secret in (DBT_TOKEN, moto.secret, HEADER_KEY):
        assert secret.encode() not in stored, secret
        assert secret not in outputs, secret
        assert secret not in seen, secret


@pytest.mark.slow
def test_triggerer_sigkill_never_cancels_the_dbt_run(
    sqlite_url: str, dbt: FakeDbtCloud, procs: Callable[..., Proc]
) -> None:
    env = deferrun_env(sqlite_url)
    env["DEFERRUN_CONN_DBT_CLOUD_DEFAULT"] = dbt.uri()
    procs(["worker"], env)
    first = procs(["triggerer"], env)
    with Client(sqlite_url) as client:
        task_id = client.submit(op(199))  # runs until told otherwise
        wait_until(lambda: client.get(task_id).state is TaskState.DEFERRED, 20, message="defer")
        run = max(dbt.runs.values(), key=lambda r: r.id)
        polls = run.polls
        wait_until(lambda: run.polls > polls, 10, message="the first triggerer to poll")
        first.kill()
        first.popen.wait(10)
        procs(["triggerer"], env)
        polls = run.polls
        wait_until(lambda: run.polls > polls, 30, message="a new triggerer to take over")
        run.outcome = 10
        info = client.wait(task_id, timeout=30)
    assert info.state is TaskState.SUCCESS, info.error
    assert run.cancels == 0
