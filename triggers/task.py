"""Wait on a task you did not submit: fired by the store when that task ends.

``TaskStateTrigger`` names the task it watches (``watched_task()``); the store fires it with
``{"task_id", "state", "result"}`` in the very transaction that ends that task (or at once,
if it had already ended), so no triggerer polls the database for it. Its ``run()`` never
needs to do anything.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import anyio

from deferrun.core.basetrigger import BaseTrigger, TriggerEvent
from deferrun.core.models import FINISHED_STATES

#: the end states a watcher fails on unless told otherwise
DEFAULT_FAILED_STATES = ("failed", "upstream_failed", "cancelled")


def check_states(states: Sequence[str], what: str) -> list[str]:
    names = {str(s) for s in FINISHED_STATES}
    if isinstance(states, str):
        states = [states]
    bad = [s for s in states if s not in names]
    if bad:
        raise ValueError(
            f"{what} must be end states ({', '.join(sorted(names))}); got {', '.join(bad)}"
        )
    return list(states)


class TaskStateTrigger(BaseTrigger):
    """Fires with the watched task's end state and result once it ends."""

    def __init__(
        self,
        task_id: str,
        states: Sequence[str] = ("success",),
        failed_states: Sequence[str] = DEFAULT_FAILED_STATES,
    ) -> None:
        if not isinstance(task_id, str) or not task_id:
            raise ValueError(f"task_id must be the id of a submitted task, got {task_id!r}")
        self.task_id_watched = task_id
        self.states = check_states(states, "states")
        self.failed_states = check_states(failed_states, "failed_states")

    def serialize(self) -> tuple[str, dict[str, object]]:
        return "triggers.task.TaskStateTrigger", {
            "task_id": self.task_id_watched,
            "states": self.states,
            "failed_states": self.failed_states,
        }

    def watched_task(self) -> str | None:
        return self.task_id_watched

    async def run(self) -> AsyncIterator[TriggerEvent]:
        await anyio.sleep_forever()  # the store fires this trigger; nothing to poll
        yield TriggerEvent(None)


__all__ = [
    "TaskStateTrigger",
]
