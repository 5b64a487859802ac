"""Airflow's exception family, mapped onto deferrun's outcomes: a skip ends the task skipped,
a fail ends it failed without retries, a sensor timeout fails it without retries (or skips it
with ``soft_fail``), anything else is an ordinary failure that uses the task's retries."""

from __future__ import annotations

from deferrun.exceptions import (
    ConfigError,
    FailTask,
    SerializationError,
    SkipTask,
    TaskDeferred,
    TaskTimeout,
)
from deferrun.sensors import SensorTimeout


class AirflowException(Exception):
    """Base of Airflow's errors: fails the task, which is retried while tries remain."""

    status_code = 500


class AirflowBadRequest(AirflowException):
    status_code = 400


class AirflowNotFoundException(AirflowException, ConfigError):
    """A connection (or other resource) is missing."""

    status_code = 404


class AirflowConfigException(AirflowException, ConfigError):
    """A setting is unusable."""


class AirflowSkipException(AirflowException, SkipTask):
    """Ends the task ``skipped``."""


class AirflowFailException(AirflowException, FailTask):
    """Ends the task ``failed`` without using its retries."""


class AirflowSensorTimeout(AirflowException, SensorTimeout):
    """A sensor's own timeout passed: failed without retry."""


class AirflowTaskTimeout(AirflowException, TaskTimeout):
    """The task ran past its ``execution_timeout`` (or a deferral past its timeout)."""


class TaskDeferralError(AirflowException, FailTask, SerializationError):
    """The task could not defer (its trigger cannot be stored or rebuilt): failed, no retry,
    raised from ``defer()`` itself so nothing after it runs."""


class TaskDeferralTimeout(AirflowTaskTimeout):
    """A deferral's timeout passed."""


class AirflowRescheduleException(AirflowException):
    """Not supported: deferrun sensors reschedule with ``mode='reschedule'``."""


class AirflowOptionalProviderFeatureException(AirflowException):
    """An optional feature of a provider is not available."""


class AirflowProviderDeprecationWarning(DeprecationWarning):
    """Issued for deprecated provider features."""

    deprecated_provider_since: str | None = None


class RemovedInAirflow3Warning(DeprecationWarning):
    """Issued for features Airflow 3 removed."""


class DuplicateTaskIdFound(AirflowException):
    """Kept for imports; deferrun has no DAG object to hold duplicates."""


__all__ = [
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
    "DuplicateTaskIdFound",
    "RemovedInAirflow3Warning",
    "TaskDeferralError",
    "TaskDeferralTimeout",
    "TaskDeferred",
]
