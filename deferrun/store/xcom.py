"""XCom rows: small named values a task pushes (``ti.xcom_push``), kept with the task.

They are written when the attempt ends, fenced on its claim token like its outcome, so a
stale attempt cannot write them; a fresh try (not a resume) starts with none, as in Airflow.
A task reads its own values and its upstream tasks' values (through ``deferrun_deps``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from deferrun.store.machine import FENCE
from deferrun.store.sql import Program, Query, R, run, run_many

LOAD = Query(
    "xcom_load",
    """SELECT task_id, xcom_key, value FROM deferrun_xcom WHERE task_id = :task_id
    UNION ALL
    SELECT x.task_id, x.xcom_key, x.value FROM deferrun_xcom x
    JOIN deferrun_deps d ON d.upstream_id = x.task_id WHERE d.task_id = :task_id""",
)
_HOLDS = Query("xcom_holds", f"SELECT id FROM deferrun_tasks WHERE {FENCE} {{lock}}")
CLEAR = Query("xcom_clear", "DELETE FROM deferrun_xcom WHERE task_id = :task_id")
_PUT = Query(
    "xcom_put",
    """INSERT INTO deferrun_xcom (task_id, xcom_key, value) VALUES (:task_id, :xcom_key, :value)
    ON CONFLICT (task_id, xcom_key) DO UPDATE SET value = excluded.value {count}""",
    many=True,
)


@dataclass(frozen=True)
class XComWrite:
    """What an attempt pushed (key -> JSON), written with its outcome in one transaction;
    ``clear`` (a fresh retry) drops the earlier try's values first."""

    values: Mapping[str, str] = field(default_factory=dict)
    clear: bool = False


def with_xcoms(
    task_id: str, claim_token: int, xcoms: XComWrite | None, outcome: Program[R]
) -> Program[R]:
    """``outcome`` preceded by the attempt's XCom writes, so both commit or neither does (an
    outcome kept through an outage keeps its XComs). Both are fenced on the same claim."""
    if xcoms is not None and (xcoms.values or xcoms.clear):
        yield from write(task_id, claim_token, xcoms.values, xcoms.clear)
    return (yield from outcome)


def write(task_id: str, claim_token: int, values: Mapping[str, str], clear: bool) -> Program[bool]:
    """Store ``values`` (key -> JSON) for the attempt holding ``claim_token``; ``clear`` drops
    the task's earlier values first. False (nothing written) if the attempt lost the task."""
    held = yield run(_HOLDS, task_id=task_id, claim_token=claim_token)
    if not held:
        return False
    if clear:
        yield run(CLEAR, task_id=task_id)
    if values:
        yield run_many(
            _PUT, [{"task_id": task_id, "xcom_key": k, "value": v} for k, v in values.items()]
        )
    return True
