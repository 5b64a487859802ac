"""AWS sensors over :class:`triggers.aws.AwsWaiterTrigger`: a few lines each, all three modes.

Each names a waiter (botocore's, or deferrun's own in ``triggers/aws_waiters/``) and its API
arguments; the sensor's ``timeout`` bounds the wait (the waiter's maxAttempts does not apply).
"""

from __future__ import annotations

from typing import Any

from deferrun.core.basetrigger import BaseTrigger
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


def airflow_filter(
    message_filtering: str | None, values: list[Any] | None, config: str | None
) -> dict[str, Any] | None:
    """Airflow's SqsSensor filtering keywords as an SqsTrigger ``message_filter``."""
    if message_filtering is None:
        return None
    if message_filtering == "literal":
        return {"literal": True, "in": list(values or [])}
    if message_filtering == "jsonpath":
        if not config:
            raise ValueError("message_filtering='jsonpath' needs message_filtering_config")
        field = config.removeprefix("$").lstrip(".")
        return {"field": field, "in": list(values)} if values else {"field": field, "exists": True}
    raise ValueError(
        f"message_filtering must be None, 'literal' or 'jsonpath', got {message_filtering!r}"
    )


class SqsSensor(TriggerSensor):
    """Waits for messages on ``sqs_queue`` (Airflow's keywords); result ``{"messages": [...]}``.

    Deferrable: one shared long-poll loop per queue in the triggerer, messages deleted only
    after the event is stored. Poke/reschedule: one receive per poke in the worker, matching
    messages deleted on reception (``delete_message_on_reception``), as Airflow does.
    """

    def __init__(
        self,
        *,
        sqs_queue: str,
        aws_conn_id: str = "aws_default",
        max_messages: int = 5,
        wait_time_seconds: int = 1,
        message_filtering: str | None = None,
        message_filtering_match_values: list[Any] | None = None,
        message_filtering_config: str | None = None,
        delete_message_on_reception: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_poke_interval(self)
        self.sqs_queue = sqs_queue
        self.aws_conn_id = aws_conn_id
        self.max_messages = max_messages
        self.wait_time_seconds = wait_time_seconds
        self.message_filter = airflow_filter(
            message_filtering, message_filtering_match_values, message_filtering_config
        )
        self.delete_message_on_reception = delete_message_on_reception
        self.trigger()  # validates the arguments at submit time

    def trigger(self) -> BaseTrigger:
        from triggers.sqs import SqsTrigger

        return SqsTrigger(
            queue_url=self.sqs_queue,
            max_messages=self.max_messages,
            message_filter=self.message_filter,
            delete_on_event=self.delete_message_on_reception,
            aws_conn_id=self.aws_conn_id,
            wait_time_seconds=self.wait_time_seconds,
        )

    def poke(self, context: Any) -> Any:
        from triggers.sqs import receive_once

        messages = self._portal.call(
            receive_once,
            self.aws_conn_id,
            self.sqs_queue,
            self.max_messages,
            self.wait_time_seconds,
            self.message_filter,
            self.delete_message_on_reception,
        )
        return {"messages": messages} if messages else False


__all__ = [
    "AthenaQuerySensor",
    "AwsWaiterSensor",
    "BatchJobSensor",
    "EmrJobFlowSensor",
    "EmrStepSensor",
    "GlueCrawlerSensor",
    "SqsSensor",
]
