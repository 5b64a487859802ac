"""Helpers for trigger authors' unit tests.

``run_trigger`` runs a trigger the way the triggerer would: it round-trips it through
``serialize()`` and JSON first (so a trigger that would not survive storage fails here, not in
production), runs it to its first event, and always runs ``cleanup()``.
"""

from __future__ import annotations

import anyio

from deferrun import serialization
from deferrun.connections import close_shared_clients
from deferrun.trigger import BaseTrigger, TriggerEvent


async def arun_trigger(trigger: BaseTrigger, timeout: float = 30.0) -> TriggerEvent:
    """Async twin of :func:`run_trigger`, for tests that already run an event loop."""
    classpath, kwargs = trigger.serialize()
    stored = serialization.dumps(kwargs, f"{type(trigger).__qualname__} kwargs")
    rebuilt = serialization.instantiate(
        classpath, serialization.loads(stored), BaseTrigger, "trigger"
    )
    try:
        with anyio.fail_after(timeout):
            agen = rebuilt.run()
            try:
                async for event in agen:
                    if not isinstance(event, TriggerEvent):
                        raise TypeError(f"{classpath}.run() yielded {event!r}, not a TriggerEvent")
                    payload = serialization.loads(serialization.dumps(event.payload, "payload"))
                    return TriggerEvent(payload)
            finally:
                await agen.aclose()
    finally:
        with anyio.CancelScope(shield=True):
            await rebuilt.cleanup()
            await close_shared_clients()
    raise AssertionError(f"{classpath}.run() returned without yielding an event")


def run_trigger(trigger: BaseTrigger, timeout: float = 30.0) -> TriggerEvent:
    """Run ``trigger`` in-process to its first event; TimeoutError after ``timeout`` s."""
    return anyio.run(arun_trigger, trigger, timeout)
