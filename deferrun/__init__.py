"""deferrun: a runtime for deferrable operators.

Workers run operators; an operator that must wait raises a defer signal, its trigger is
stored, and one asyncio triggerer process waits on thousands of triggers at once, resuming
each task through the queue when its event fires.
"""

from deferrun.client import AsyncClient, Client
from deferrun.core.baseoperator import BaseOperator, Context
from deferrun.core.basetrigger import (
    BaseTrigger,
    PollingTrigger,
    TaskFailedEvent,
    TaskSkippedEvent,
    TaskSuccessEvent,
    TriggerEvent,
)
from deferrun.core.models import TaskInfo, TaskState, TriggerInfo
from deferrun.exceptions import (
    ConfigError,
    DeferrunError,
    FailTask,
    SerializationError,
    SkipTask,
    TaskDeferred,
    TaskEnded,
    TaskNotFound,
    TaskTimeout,
    TransientError,
    TriggerFailed,
)
from deferrun.sensors import BaseSensor

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "BaseOperator",
    "BaseSensor",
    "BaseTrigger",
    "Client",
    "ConfigError",
    "Context",
    "DeferrunError",
    "FailTask",
    "PollingTrigger",
    "SerializationError",
    "SkipTask",
    "TaskDeferred",
    "TaskEnded",
    "TaskFailedEvent",
    "TaskInfo",
    "TaskNotFound",
    "TaskSkippedEvent",
    "TaskState",
    "TaskSuccessEvent",
    "TaskTimeout",
    "TransientError",
    "TriggerEvent",
    "TriggerFailed",
    "TriggerInfo",
    "__version__",
]
