"""Airflow names for code ported to deferrun: rewrite each ``from airflow.<core module> import
X`` to ``from deferrun.compat.airflow import X`` and nothing else.

Core modules are those provider code imports from Airflow itself: ``airflow``,
``airflow.triggers.base``, ``airflow.sdk`` (and ``airflow.sdk.definitions.context``),
``airflow.models``, ``airflow.sensors.base``, ``airflow.hooks.base``, ``airflow.exceptions``,
``airflow.utils`` / ``.timezone`` / ``.context`` / ``.operator_helpers``,
``airflow.configuration``, ``airflow.providers.common.compat.sdk`` and the providers'
``version_compat`` flags. Provider hooks (dbt Cloud, HTTP, ...) stay the user's own modules.
What each name maps to, and what has no effect, is in docs/guide/airflow.md.
"""

from __future__ import annotations

from typing import Any

import structlog

from deferrun.compat import _timezone as timezone
from deferrun.compat._conf import conf
from deferrun.compat._exceptions import (
    AirflowBadRequest,
    AirflowConfigException,
    AirflowException,
    AirflowFailException,
    AirflowNotFoundException,
    AirflowOptionalProviderFeatureException,
    AirflowProviderDeprecationWarning,
    AirflowRescheduleException,
    AirflowSensorTimeout,
    AirflowSkipException,
    AirflowTaskTimeout,
    DuplicateTaskIdFound,
    RemovedInAirflow3Warning,
    TaskDeferralError,
    TaskDeferralTimeout,
    TaskDeferred,
)
from deferrun.compat._hooks import BaseHook, Connection
from deferrun.compat._operators import (
    XCOM_RETURN_KEY,
    BaseOperator,
    BaseOperatorLink,
    BaseSensorOperator,
    BaseTrigger,
    PokeReturnValue,
    StartTriggerArgs,
    determine_kwargs,
)
from deferrun.core import basetrigger
from deferrun.core.basetrigger import TriggerEvent
from deferrun.worker.context import DagRun, TaskInstance
from deferrun.worker.context import XComError as XComError

#: the Airflow API level this layer follows (provider ``version_compat`` modules compare it)
__version__ = "3.1.0"
AIRFLOW_VERSION = (3, 1, 0)
AIRFLOW_V_2_9_PLUS = True
AIRFLOW_V_2_10_PLUS = True
AIRFLOW_V_3_0_PLUS = True
AIRFLOW_V_3_0_1 = True
AIRFLOW_V_3_1_PLUS = True

#: what operators receive: a dict (Airflow's is a TypedDict of the same keys)
Context = dict

Operator = BaseOperator
BaseSensor = BaseSensorOperator


def _result_of(kind: str, xcoms: dict[str, Any] | None) -> Any:
    """Airflow's end events carry XComs; the ``return_value`` one becomes the result."""
    if not xcoms:
        return None
    others = sorted(k for k in xcoms if k != XCOM_RETURN_KEY)
    if others:
        structlog.get_logger("deferrun.compat").warning(
            f"{kind}(xcoms=...): only 'return_value' is kept (as the task's result); push "
            "other values from the operator instead",
            dropped=others,
        )
    return xcoms.get(XCOM_RETURN_KEY)


class TaskSuccessEvent(basetrigger.TaskSuccessEvent):
    """Ends the task ``success`` from the trigger; ``xcoms["return_value"]`` is its result."""

    def __init__(self, result: Any = None, *, xcoms: dict[str, Any] | None = None) -> None:
        super().__init__(result if xcoms is None else _result_of("TaskSuccessEvent", xcoms))


class TaskFailedEvent(basetrigger.TaskFailedEvent):
    """Ends the task ``failed`` (no retry) from the trigger."""

    def __init__(
        self,
        error: str = "the trigger ended the task as failed",
        *,
        xcoms: dict[str, Any] | None = None,
    ) -> None:
        _result_of("TaskFailedEvent", xcoms)
        super().__init__(error)


class TaskSkippedEvent(basetrigger.TaskSkippedEvent):
    """Ends the task ``skipped`` from the trigger."""

    def __init__(self, reason: str | None = None, *, xcoms: dict[str, Any] | None = None) -> None:
        _result_of("TaskSkippedEvent", xcoms)
        super().__init__(reason)


def get_base_airflow_version_tuple() -> tuple[int, int, int]:
    return AIRFLOW_VERSION


class XCom:
    """Only the constant: push and pull through ``context["ti"]``."""

    XCOM_RETURN_KEY = XCOM_RETURN_KEY

    @staticmethod
    def get_value(*_: object, **__: object) -> object:
        raise NotImplementedError(
            "XCom.get_value is not available in deferrun; use context['ti'].xcom_pull(...)"
        )

    @staticmethod
    def get_one(*_: object, **__: object) -> object:
        raise NotImplementedError(
            "XCom.get_one is not available in deferrun; use context['ti'].xcom_pull(...)"
        )

    @staticmethod
    def set(*_: object, **__: object) -> None:
        raise NotImplementedError(
            "XCom.set is not available in deferrun; use context['ti'].xcom_push(key, value)"
        )


__all__ = [
    "AIRFLOW_V_2_9_PLUS",
    "AIRFLOW_V_2_10_PLUS",
    "AIRFLOW_V_3_0_1",
    "AIRFLOW_V_3_0_PLUS",
    "AIRFLOW_V_3_1_PLUS",
    "XCOM_RETURN_KEY",
    "AirflowBadRequest",
    "AirflowConfigException",
    "AirflowException",
    "AirflowFailException",
    "AirflowNotFoundException",
    "AirflowOptionalProviderFeatureException",
    "AirflowProviderDeprecationWarning",
    "AirflowRescheduleException",
    "AirflowSensorTimeout",
    "AirflowSkipException",
    "AirflowTaskTimeout",
    "BaseHook",
    "BaseOperator",
    "BaseOperatorLink",
    "BaseSensor",
    "BaseSensorOperator",
    "BaseTrigger",
    "Connection",
    "Context",
    "DagRun",
    "DuplicateTaskIdFound",
    "Operator",
    "PokeReturnValue",
    "RemovedInAirflow3Warning",
    "StartTriggerArgs",
    "TaskDeferralError",
    "TaskDeferralTimeout",
    "TaskDeferred",
    "TaskFailedEvent",
    "TaskInstance",
    "TaskSkippedEvent",
    "TaskSuccessEvent",
    "TriggerEvent",
    "XCom",
    "XComError",
    "__version__",
    "conf",
    "determine_kwargs",
    "get_base_airflow_version_tuple",
    "timezone",
]
