"""Time triggers: fire when a moment passes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio

from deferrun.core.basetrigger import BaseTrigger, TriggerEvent


def checked_aware(moment: datetime) -> datetime:
    """``moment`` if it is an aware datetime; a naive one would mean a different time on
    each host."""
    if not isinstance(moment, datetime):
        raise TypeError(f"moment must be a datetime, got {moment!r}")
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(
            f"moment {moment.isoformat()} has no time zone; pass an aware datetime such as "
            "datetime.now(timezone.utc) + timedelta(...), so every host agrees on when it is"
        )
    return moment


class DateTimeTrigger(BaseTrigger):
    """Fires once ``moment`` (a tz-aware datetime) has passed; the event is the moment."""

    def __init__(self, moment: datetime) -> None:
        self.moment = checked_aware(moment)

    def fire_at(self) -> float:
        return self.moment.timestamp()

    def timer(self) -> tuple[float, Any] | None:
        # A subclass that overrides run() or cleanup() wants them called: no shortcut then.
        cls = type(self)
        if cls.run is not DateTimeTrigger.run or cls.cleanup is not BaseTrigger.cleanup:
            return None
        return self.fire_at(), self.moment

    async def run(self) -> AsyncIterator[TriggerEvent]:
        target = self.fire_at()
        # Re-check the wall clock after each sleep: monotonic sleeps drift from UTC when the
        # system clock is stepped, and the contract is "fires when the moment passes".
        while (remaining := target - time.time()) > 0:
            await anyio.sleep(min(remaining, 3600.0))
        yield TriggerEvent(self.moment)


class TimeDeltaTrigger(DateTimeTrigger):
    """Fires ``delta`` after it was created (i.e. at defer time), not after the triggerer
    picked it up: it is stored as a DateTimeTrigger for that moment."""

    def __init__(self, delta: timedelta | float) -> None:
        if isinstance(delta, int | float) and not isinstance(delta, bool):
            delta = timedelta(seconds=delta)
        if not isinstance(delta, timedelta):
            raise TypeError(f"delta must be a timedelta or seconds, got {delta!r}")
        self.delta = delta
        super().__init__(moment=datetime.now(UTC) + delta)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return "triggers.time.DateTimeTrigger", {"moment": self.moment}


__all__ = [
    "DateTimeTrigger",
    "TimeDeltaTrigger",
]
