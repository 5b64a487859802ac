"""Helpers for trigger authors' unit tests.

``run_trigger`` runs a trigger exactly as the triggerer does: it stores it (``serialize()`` and
JSON), rebuilds it from that row, takes the ``timer()`` shortcut when the trigger offers one,
and otherwise runs ``run()`` through the same function the triggerer uses
(``deferrun.triggerer.trigger_run``), with the same checks, size limit, ids and ``cleanup()``.
"""

from __future__ import annotations

import anyio

from deferrun.connections.cache import close_loop_clients
from deferrun.core import serialization
from deferrun.core.basetrigger import BaseTrigger, TriggerEvent
from deferrun.core.models import ClaimedTrigger
from deferrun.exceptions import TriggerFailed
from deferrun.process import containment
from deferrun.triggerer.trigger_run import (
    TIMED_OUT,
    Limits,
    max_event_bytes_from_env,
    run_to_first_event,
)


async def arun_trigger(
    trigger: BaseTrigger,
    timeout: float = 30.0,
    *,
    trigger_id: int = 1,
    task_id: str = "test-task",
    max_event_bytes: int | None = None,
    cleanup_timeout: float = 10.0,
) -> TriggerEvent:
    """Async twin of :func:`run_trigger`, for tests that already run an event loop.

    Returns the event as the resumed task would see it (payload stored and loaded again).
    Raises what the trigger itself raised; ``TriggerFailed`` with the triggerer's message for
    any other misbehaviour (not an async generator, no event, bad payload, ...); and
    ``TimeoutError`` when no event came within ``timeout`` seconds.
    """
    classpath, kwargs = trigger.serialize()
    row = ClaimedTrigger(
        id=trigger_id,
        task_id=task_id,
        classpath=classpath,
        kwargs=serialization.dumps(kwargs, f"{type(trigger).__qualname__} kwargs"),
        timeout_in=timeout,
    )
    limits = Limits(max_event_bytes or max_event_bytes_from_env(), cleanup_timeout)
    containment.install()  # as in the triggerer: the trigger's own tasks cannot stop this one
    try:
        outcome = await run_to_first_event(row, limits)
    finally:
        with anyio.CancelScope(shield=True):
            await close_loop_clients()
    if outcome.fired:
        return TriggerEvent(serialization.loads(outcome.payload))
    if outcome.method == TIMED_OUT:
        raise TimeoutError(outcome.error)
    if isinstance(outcome.exc, Exception) and not isinstance(outcome.exc, TriggerFailed):
        raise outcome.exc
    raise TriggerFailed(outcome.error)


def run_trigger(trigger: BaseTrigger, timeout: float = 30.0, **options: object) -> TriggerEvent:
    """Run ``trigger`` in-process to its first event; TimeoutError after ``timeout`` s."""

    async def main() -> TriggerEvent:
        return await arun_trigger(trigger, timeout, **options)  # type: ignore[arg-type]

    return anyio.run(main)


__all__ = [
    "arun_trigger",
    "run_trigger",
]
