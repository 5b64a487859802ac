"""Row -> record conversions both backends share, so users see identical TaskInfo."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deferrun.core import serialization
from deferrun.core.models import TaskInfo, TaskState, ts

# Column order both backends select for TaskInfo (tasks t LEFT JOIN triggers g).
TASK_INFO_COLUMNS = """t.id, t.name, t.classpath, t.queue, t.state, t.try_number, t.max_tries,
    t.result, t.error, t.next_method, t.trigger_id, g.classpath, g.triggerer_id, t.worker_id,
    t.defer_deadline, t.ready_at, t.created_at, t.started_at, t.updated_at, t.finished_at"""


_STATES = {str(s) for s in TaskState}


def load_or_raw(text: str | None) -> Any:
    """Decode stored JSON; on failure show the raw text rather than hide the row."""
    if text is None:
        return None
    try:
        return serialization.loads(text)
    except Exception:
        return text


def task_info(row: Sequence[Any]) -> TaskInfo:
    state: TaskState | str = row[4] if row[4] not in _STATES else TaskState(row[4])
    waiting = state in (TaskState.UP_FOR_RETRY, TaskState.UP_FOR_RESCHEDULE)
    return TaskInfo(
        id=row[0],
        name=row[1],
        classpath=row[2],
        queue=row[3],
        state=state,
        try_number=row[5],
        max_tries=row[6],
        result=load_or_raw(row[7]),
        error=row[8],
        next_method=row[9],
        trigger_id=row[10],
        trigger_classpath=row[11],
        triggerer_id=row[12],
        worker_id=row[13] if state is TaskState.RUNNING else None,
        defer_deadline=ts(row[14]),
        not_before=ts(row[15]) if waiting else None,
        created_at=ts(row[16]),
        started_at=ts(row[17]),
        updated_at=ts(row[18]),
        finished_at=ts(row[19]),
        created_key=_key(row[16]),
    )


def _key(value: Any) -> float | None:
    """The stored ``created_at`` as the keyset cursor's key; None for a value that is not a
    number (a forged row), so such a row still lists (and cannot be a cursor)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
