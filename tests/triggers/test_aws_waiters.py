"""AwsWaiterTrigger and the AWS sensors against the moto server, whose state we drive where
moto has no transition of its own (EMR steps, crawl results, Athena failures)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread
import pytest

from deferrun import TaskState
from deferrun.aws_sensors import (
    AthenaQuerySensor,
    BatchJobSensor,
    EmrJobFlowSensor,
    EmrStepSensor,
    GlueCrawlerSensor,
)
from deferrun.store import Store
from deferrun.testing import arun_trigger
from tests.support.runtime import runtime_for
from tests.support.services import Moto
from triggers.aws import AwsWaiterTrigger, WaiterFailed, failure_reason

pytestmark = pytest.mark.anyio
MODES = ["poke", "reschedule", "deferrable"]
ACCOUNT, REGION = "123456789012", "us-east-1"


def backend(service: str) -> Any:
    import importlib

    module = importlib.import_module(f"moto.{service}.models")
    return getattr(module, f"{service}_backends")[ACCOUNT][REGION]


def new_cluster(aws: Moto) -> tuple[str, str]:
    emr = aws.boto("emr")
    cluster = emr.run_job_flow(
        Name=f"c-{uuid.uuid4().hex[:6]}",
        Instances={"InstanceCount": 1, "KeepJobFlowAliveWhenNoSteps": True},
        ReleaseLabel="emr-6.0.0",
        JobFlowRole="r",
        ServiceRole="r",
    )["JobFlowId"]
    step = emr.add_job_flow_steps(
        JobFlowId=cluster,
        Steps=[{"Name": "s", "ActionOnFailure": "CONTINUE", "HadoopJarStep": {"Jar": "x"}}],
    )["StepIds"][0]
    return cluster, step


def set_step(cluster: str, step: str, state: str) -> None:
    for s in backend("emr").clusters[cluster].steps:
        if s.id == step:
            s.state = state


def new_crawler(aws: Moto, start: bool = True) -> str:
    name = f"crawler-{uuid.uuid4().hex[:6]}"
    glue = aws.boto("glue")
    glue.create_crawler(Name=name, Role="r", Targets={"S3Targets": [{"Path": "s3://b/x"}]})
    if start:
        glue.start_crawler(Name=name)
    return name


def end_crawl(name: str, status: str) -> None:
    backend("glue").crawlers[name].crawls[-1].status = status


def new_query(aws: Moto) -> str:
    from moto.moto_api import state_manager

    # moto's Athena executions otherwise succeed at once: let them run until told
    state_manager.set_transition(
        model_name="athena::execution", transition={"progression": "manual", "times": 10**6}
    )
    return aws.boto("athena").start_query_execution(
        QueryString="select 1", ResultConfiguration={"OutputLocation": "s3://b/o"}
    )["QueryExecutionId"]


def end_query(query_id: str, state: str) -> None:
    backend("athena").executions[query_id].status = state


async def later(delay: float, action: Callable[[], None]) -> None:
    await anyio.sleep(delay)
    action()


# --------------------------------------------------------------------------- the trigger


@pytest.mark.slow
async def test_waiter_success_after_retries(aws: Moto) -> None:
    cluster, step = new_cluster(aws)
    trigger = AwsWaiterTrigger(
        "emr", "StepComplete", {"ClusterId": cluster, "StepId": step}, poll_interval=0.1
    )
    started = anyio.current_time()
    async with anyio.create_task_group() as tg:
        tg.start_soon(later, 0.5, lambda: set_step(cluster, step, "COMPLETED"))
        event = await arun_trigger(trigger, timeout=15)
    assert event.payload["status"] == "success" and event.payload["waiter"] == "StepComplete"
    assert event.payload["response"]["Step"]["Status"]["State"] == "COMPLETED"
    assert anyio.current_time() - started >= 0.45  # RUNNING was a retry, not an end


async def test_waiter_failure_names_state_and_reason(aws: Moto) -> None:
    cluster, step = new_cluster(aws)
    set_step(cluster, step, "FAILED")
    trigger = AwsWaiterTrigger(
        "emr", "StepComplete", {"ClusterId": cluster, "StepId": step}, poll_interval=0.1
    )
    with pytest.raises(WaiterFailed, match=r"reached a failure state .*'FAILED'"):
        await arun_trigger(trigger, timeout=15)


async def test_error_acceptor_and_path_any(aws: Moto) -> None:
    missing = AwsWaiterTrigger("glue", "CrawlerReady", {"Name": "nope"}, poll_interval=0.1)
    with pytest.raises(WaiterFailed, match=r"error .*EntityNotFoundException"):
        await arun_trigger(missing, timeout=15)
    unknown_job = AwsWaiterTrigger("batch", "JobComplete", {"jobs": ["nope"]}, poll_interval=0.1)
    with pytest.raises(WaiterFailed, match="length"):
        await arun_trigger(unknown_job, timeout=15)


async def test_cluster_terminated_and_max_attempts(aws: Moto) -> None:
    cluster, _ = new_cluster(aws)
    waiting = AwsWaiterTrigger(
        "emr", "ClusterTerminated", {"ClusterId": cluster}, poll_interval=0.05, max_attempts=3
    )
    with pytest.raises(WaiterFailed, match="did not reach a success state in 3 attempts"):
        await arun_trigger(waiting, timeout=15)
    await anyio.to_thread.run_sync(
        lambda: aws.boto("emr").terminate_job_flows(JobFlowIds=[cluster])
    )
    done = AwsWaiterTrigger("emr", "ClusterTerminated", {"ClusterId": cluster}, poll_interval=0.05)
    assert (await arun_trigger(done, timeout=15)).payload["status"] == "success"


def test_unknown_waiter_and_reasons() -> None:
    from triggers.aws import waiter_config

    with pytest.raises(
        ValueError, match=r"no AWS waiter 'Nope' for service 'emr'; known: .*StepComplete"
    ):
        waiter_config("emr", "Nope")
    reason = failure_reason(
        {"Step": {"Status": {"FailureDetails": {"Reason": "OOM", "Message": "killed"}}}}
    )
    assert reason == "Reason=OOM; Message=killed"


# --------------------------------------------------------------------------- sensors


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
async def test_aws_sensors_in_every_mode(store: Store, aws: Moto, mode: str) -> None:
    cluster, step = new_cluster(aws)
    crawler, bad_crawler = new_crawler(aws), new_crawler(aws)
    query, bad_query = new_query(aws), new_query(aws)
    common: dict[str, Any] = {"mode": mode, "poke_interval": 0.1, "timeout": 30}
    async with runtime_for(store, slots=8) as rt:
        ids = {
            name: await rt.client.submit(sensor)
            for name, sensor in {
                "step": EmrStepSensor(job_flow_id=cluster, step_id=step, **common),
                "cluster": EmrJobFlowSensor(job_flow_id=cluster, **common),
                "crawler": GlueCrawlerSensor(crawler_name=crawler, **common),
                "bad_crawler": GlueCrawlerSensor(crawler_name=bad_crawler, **common),
                "query": AthenaQuerySensor(query_execution_id=query, **common),
                "bad_query": AthenaQuerySensor(query_execution_id=bad_query, **common),
                "batch": BatchJobSensor(job_id="no-such-job", **common),
            }.items()
        }
        await anyio.sleep(0.5)
        for name in ("step", "cluster", "crawler", "query"):
            assert not (await rt.client.get(ids[name])).finished, name
        set_step(cluster, step, "COMPLETED")
        end_crawl(crawler, "COMPLETED")
        end_crawl(bad_crawler, "FAILED")
        end_query(query, "SUCCEEDED")
        end_query(bad_query, "FAILED")
        await anyio.to_thread.run_sync(
            lambda: aws.boto("emr").terminate_job_flows(JobFlowIds=[cluster])
        )
        infos = {name: await rt.client.wait(tid, timeout=30) for name, tid in ids.items()}
    for name in ("step", "cluster", "crawler", "query"):
        assert infos[name].state is TaskState.SUCCESS, (name, infos[name].error)
        assert infos[name].result["status"] == "success"
    for name in ("bad_crawler", "bad_query", "batch"):
        assert infos[name].state is TaskState.FAILED, name
        assert "WaiterFailed" in (infos[name].error or ""), infos[name].error
    assert "'FAILED'" in (infos["bad_query"].error or "")


THROTTLE_CODES = [
    "ThrottlingException",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "ProvisionedThroughputExceededException",
    "RequestThrottled",
    "ThrottledException",
    "SlowDown",
    "PriorRequestNotComplete",
    "EC2ThrottledException",
    "BandwidthLimitExceeded",
    "RequestThrottledException",
    "TransactionInProgressException",
]


@pytest.mark.parametrize("code", THROTTLE_CODES)
def test_aws_throttling_codes_are_transient(code: str) -> None:
    """AWS throttles with HTTP 400 and one of botocore's throttling codes: retry, never fail
    (the same classify() serves S3, SQS and the waiter trigger)."""
    from botocore.exceptions import ClientError

    from deferrun.exceptions import TransientError
    from triggers.s3 import classify

    exc = ClientError(
        {
            "Error": {"Code": code, "Message": "Rate exceeded"},
            "ResponseMetadata": {"HTTPStatusCode": 400},
        },
        "ReceiveMessage",
    )
    assert isinstance(classify(exc, "x"), TransientError)
    not_found = ClientError(
        {
            "Error": {"Code": "ResourceNotFoundException"},
            "ResponseMetadata": {"HTTPStatusCode": 400},
        },
        "DescribeStep",
    )
    assert not isinstance(classify(not_found, "x"), TransientError)


@pytest.mark.slow
@pytest.mark.anyio
async def test_waiter_retries_through_throttling(monkeypatch: pytest.MonkeyPatch) -> None:
    """An EMR endpoint answering ThrottlingException (HTTP 400) for three polls, then COMPLETED: the
    waiter keeps polling and succeeds instead of failing the task on the first throttle."""
    from aiohttp import web

    from tests.support.services import ThreadedApp

    calls: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        calls.append(request.headers.get("X-Amz-Target", ""))
        if len(calls) <= 6:  # botocore retries twice per call itself: 3 polls throttled
            body = {"__type": "ThrottlingException", "message": "Rate exceeded"}
            return web.json_response(body, status=400, content_type="application/x-amz-json-1.1")
        body = {"Step": {"Id": "s-1", "Status": {"State": "COMPLETED"}}}
        return web.json_response(body, content_type="application/x-amz-json-1.1")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = ThreadedApp()
    server._serve(app, "throttling-emr")
    try:
        monkeypatch.setenv(
            "DEFERRUN_CONN_THROTTLED",
            "aws://AKIATEST:secret-key@?region_name=us-east-1&endpoint_url="
            f"http%3A%2F%2F127.0.0.1%3A{server.port}",
        )
        trigger = AwsWaiterTrigger(
            "emr",
            "StepComplete",
            {"ClusterId": "j-1", "StepId": "s-1"},
            aws_conn_id="throttled",
            poll_interval=0.05,
            max_attempts=10,
        )
        with anyio.fail_after(20):
            event = await arun_trigger(trigger, timeout=20)
    finally:
        server.stop()
    assert event.payload["status"] == "success"
    assert len(calls) == 7


@pytest.mark.parametrize("bad", [float("nan"), 2.5, 10**30, -1, True, "3"])
def test_max_attempts_must_be_a_sane_whole_number(bad: Any) -> None:
    with pytest.raises(ValueError, match="max_attempts must be a whole number"):
        AwsWaiterTrigger("emr", "StepComplete", {"ClusterId": "j"}, max_attempts=bad)
    assert AwsWaiterTrigger("emr", "StepComplete", {}, max_attempts=0).max_attempts == 0
