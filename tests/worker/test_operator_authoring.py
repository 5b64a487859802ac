"""What a new operator author writes first, on both backends: ``self.log`` with an ``event=``
field in a resume method, and a ``defer()`` whose ``method_name`` has a typo (refused in the
attempt that defers, with the close matches, not when the trigger fires)."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
import structlog

from deferrun import BaseOperator, TaskState
from deferrun.core.baseoperator import Context
from deferrun.process.log import _fields_logger
from deferrun.store import Store
from tests.support.runtime import runtime_for
from tests.support.userland import EchoTrigger

pytestmark = pytest.mark.anyio


class LogsTheEvent(BaseOperator):
    """The natural resume method: the parameter is called ``event``, and so is the field."""

    def execute(self, context: Context) -> Any:
        self.defer(trigger=EchoTrigger(value={"status": "ok"}), method_name="finish")

    def finish(self, context: Context, event: Any = None) -> Any:
        self.log.info("done", event=event)
        self.log.bind(event=event).warning("bound too", self="also a field")
        return event


class Typo(BaseOperator):
    def __init__(self, *, method: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.method = method

    limit = 3  # a class attribute that is not a method

    def execute(self, context: Context) -> Any:
        self.defer(trigger=EchoTrigger(value=1, delay=3600), method_name=self.method)

    def resume_with_rows(self, context: Context, event: Any = None) -> Any:
        return event


async def test_self_log_takes_event_as_a_field(store: Store) -> None:
    async with runtime_for(store) as rt:
        info = await rt.run_to_end(LogsTheEvent())
    assert info.state is TaskState.SUCCESS, info.error
    assert info.result == {"status": "ok"}


def test_event_keyword_is_logged_as_a_field() -> None:
    with structlog.testing.capture_logs() as logs:
        LogsTheEvent().log.info("done", event={"status": "ok"})
        LogsTheEvent().log.info(event="the message itself")  # structlog's keyword form
    assert logs[0]["event"] == "done" and logs[0]["event_"] == {"status": "ok"}
    assert logs[1]["event"] == "the message itself"

    # every logger of a process (a trigger's self.log, a module's): configure_logging's class
    out = io.StringIO()
    logger = structlog.wrap_logger(
        structlog.PrintLogger(out),
        wrapper_class=_fields_logger(20),
        processors=[structlog.processors.JSONRenderer()],
    )
    logger.bind(trigger_id=1).info("fired", event={"n": 1}, self="x")
    logger.log(20, "by level", event=2)
    logger.debug("filtered out", event=3)  # below the level: still no TypeError
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines == [
        {"trigger_id": 1, "event_": {"n": 1}, "self_": "x", "event": "fired"},
        {"event_": 2, "event": "by level"},
    ]


@pytest.mark.parametrize(
    ("method", "error"),
    [
        ("resume_with_row", "Typo has no method 'resume_with_row'; did you mean resume_with_rows"),
        ("limit", "Typo.limit is not callable"),
        ("_private", "names starting with '_' are not resumed with"),
        # found by an attack: these exist but cannot take the event; they failed with a
        # TypeError only once the trigger fired
        ("execute", "which its signature (context: 'Context') -> 'Any' does not take"),
        ("defer", "give the resume method an event=None parameter"),
    ],
)
async def test_defer_refuses_a_method_name_at_once(store: Store, method: str, error: str) -> None:
    async with runtime_for(store) as rt:
        info = await rt.run_to_end(Typo(method=method, retries=3, retry_delay=0), timeout=10)
    assert info.state is TaskState.FAILED
    assert f"defer(method_name={method!r})" in (info.error or "") and error in (info.error or "")
    assert info.try_number == 1 and info.trigger_id is None  # no retry, never deferred


def test_self_log_cannot_move_its_line_to_another_task_or_forge_its_level() -> None:
    """Found by an attack: ``self.log.info(..., task_id=X)`` stored the line in task X's log
    (any task's code could write into any task's log); ``level=`` and ``timestamp=`` were
    silently replaced. The runtime's own fields are renamed with a trailing underscore."""
    op = LogsTheEvent(task_id="mine")
    with structlog.testing.capture_logs() as logs:
        op.log.info("checked", task_id="victim", level="critical", timestamp=0, trigger_id=7)
        op.log.bind(task_id="victim").info("bound")
    checked, bound = logs
    assert "task_id" not in checked and checked["task_id_"] == "victim"
    assert checked["log_level"] == "info" and checked["level_"] == "critical"
    assert checked["timestamp_"] == 0 and checked["trigger_id_"] == 7
    assert "task_id" not in bound and bound["task_id_"] == "victim"
