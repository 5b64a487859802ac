"""AWS sensors over :class:`triggers.aws.AwsWaiterTrigger`: a few lines each, all three modes.

Each names a waiter (botocore's, or deferrun's own in ``triggers/aws_waiters/``) and its API
arguments; the sensor's ``timeout`` bounds the wait (the waiter's maxAttempts does not apply).
"""

from __future__ import annotations

from typing import Any

from deferrun.basetrigger import BaseTrigger
from deferrun.sensors import TriggerSensor, check_poke_interval


class AwsWaiterSensor(TriggerSensor):
    """Waits for ``waiter_name`` of ``service`` with ``args``; result: the waiter's event."""

    service: str = ""
    waiter_name: str = ""

    def __init__(self, *, aws_conn_id: str = "aws_default", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_poke_interval(self)
        self.aws_conn_id = aws_conn_id

    def waiter_args(self) -> dict[str, Any]:
        raise NotImplementedError

    def trigger(self) -> BaseTrigger:
        from triggers.aws import AwsWaiterTrigger

        return AwsWaiterTrigger(
            service=self.service,
            waiter_name=self.waiter_name,
            args=self.waiter_args(),
            aws_conn_id=self.aws_conn_id,
            poll_interval=self.poke_interval,
            max_attempts=0,
        )


class EmrStepSensor(AwsWaiterSensor):
    """Waits for an EMR step to complete (botocore's ``StepComplete``)."""

    service, waiter_name = "emr", "StepComplete"

    def __init__(self, *, job_flow_id: str, step_id: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.job_flow_id, self.step_id = job_flow_id, step_id

    def waiter_args(self) -> dict[str, Any]:
        return {"ClusterId": self.job_flow_id, "StepId": self.step_id}


class EmrJobFlowSensor(AwsWaiterSensor):
    """Waits for an EMR cluster: ``target="terminated"`` (default) or ``"running"``."""

    service = "emr"

    def __init__(self, *, job_flow_id: str, target: str = "terminated", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        waiters = {"terminated": "ClusterTerminated", "running": "ClusterRunning"}
        if target not in waiters:
            raise ValueError(f"target must be 'terminated' or 'running', got {target!r}")
        self.job_flow_id, self.target = job_flow_id, target
        self.waiter_name = waiters[target]

    def waiter_args(self) -> dict[str, Any]:
        return {"ClusterId": self.job_flow_id}


class GlueCrawlerSensor(AwsWaiterSensor):
    """Waits for a Glue crawler to be READY after a successful crawl; a failed or cancelled
    last crawl fails the task."""

    service, waiter_name = "glue", "CrawlerReady"

    def __init__(self, *, crawler_name: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.crawler_name = crawler_name

    def waiter_args(self) -> dict[str, Any]:
        return {"Name": self.crawler_name}


class AthenaQuerySensor(AwsWaiterSensor):
    """Waits for an Athena query execution to succeed (FAILED/CANCELLED fail the task)."""

    service, waiter_name = "athena", "QueryCompleted"

    def __init__(self, *, query_execution_id: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.query_execution_id = query_execution_id

    def waiter_args(self) -> dict[str, Any]:
        return {"QueryExecutionId": self.query_execution_id}


class BatchJobSensor(AwsWaiterSensor):
    """Waits for an AWS Batch job to succeed (FAILED, or an unknown job id, fail the task)."""

    service, waiter_name = "batch", "JobComplete"

    def __init__(self, *, job_id: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.job_id = job_id

    def waiter_args(self) -> dict[str, Any]:
        return {"jobs": [self.job_id]}
