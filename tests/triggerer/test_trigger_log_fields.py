"""A trigger's ``self.log`` takes any keyword as a field, ``event=`` too, as an operator's does:
outside a configured process as well (``run_trigger`` in a user's test)."""

from __future__ import annotations

from typing import Any

import structlog

from deferrun import BaseTrigger, TriggerEvent
from deferrun.testing import run_trigger


class LogsEvent(BaseTrigger):
    async def run(self) -> Any:
        self.log.info("polled", event={"state": "RUNNING"}, self="me")
        yield TriggerEvent("done")


def test_a_trigger_logs_event_and_self_as_fields() -> None:
    with structlog.testing.capture_logs() as logs:
        assert run_trigger(LogsEvent(), timeout=10) == TriggerEvent("done")
    [line] = [e for e in logs if e["event"] == "polled"]
    assert line["event_"] == {"state": "RUNNING"} and line["self_"] == "me"
