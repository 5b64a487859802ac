"""A defer signal as the store keeps it: the trigger serialized and checked, the timeout as a
duration. Shared by the worker (an operator defers) and the client (a task starts from a
trigger), so both refuse exactly the same triggers."""

from __future__ import annotations

from deferrun.core import classpaths, serialization
from deferrun.core import trigger_keys as sharing
from deferrun.core.baseoperator import as_seconds
from deferrun.core.basetrigger import BaseTrigger
from deferrun.core.models import Deferral
from deferrun.exceptions import SerializationError, TaskDeferred


def prepare_deferral(signal: TaskDeferred) -> Deferral:
    """Serialize a defer signal, refusing triggers the triggerer could not rebuild."""
    trigger = signal.trigger
    if not isinstance(trigger, BaseTrigger):
        raise SerializationError(f"defer() needs a BaseTrigger instance, got {trigger!r}")
    result = trigger.serialize()
    if not (isinstance(result, tuple | list) and len(result) == 2):
        raise SerializationError(
            f"{type(trigger).__qualname__}.serialize() must return (classpath, kwargs), "
            f"got {result!r}"
        )
    classpath, kwargs = result
    if not isinstance(kwargs, dict):
        raise SerializationError(f"{classpath}: serialize() kwargs must be a dict, got {kwargs!r}")
    cls, classpath = classpaths.stored_classpath(classpath, trigger, BaseTrigger)
    classpaths.check_kwargs_fit(cls, kwargs, "trigger")
    kwargs_json = serialization.dumps(kwargs, f"{cls.__qualname__} kwargs")
    timeout = as_seconds(signal.timeout, "defer timeout")
    watched = trigger.watched_task()
    try:
        poll_key = sharing.poll_key_of(trigger)
    except Exception as exc:
        raise SerializationError(f"{classpath}.shared_poll_key() raised {exc!r}") from exc
    return Deferral(
        affinity=sharing.affinity_key(classpath, kwargs_json) if sharing.shareable(cls) else None,
        poll_key=poll_key if isinstance(poll_key, str) else None,
        watch_task_id=watched if isinstance(watched, str) else None,
        classpath=classpath,
        kwargs=kwargs_json,
        method_name=signal.method_name,
        method_kwargs=serialization.dumps(signal.kwargs, f"defer(kwargs=...) of {classpath}"),
        timeout=timeout,
    )
