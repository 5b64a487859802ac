"""Which triggerer runs which trigger: fair-share claims, affinity groups, release.

Split from :mod:`deferrun.store.machine` (the task state machine): claiming triggers changes
no task state, only which triggerer holds a trigger row. Identical triggers (one affinity key)
stay on one triggerer so they run as one ``run()`` (:mod:`deferrun.triggerer.shared_runs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deferrun.core.models import ClaimedTrigger
from deferrun.store.sql import Notify, Program, Query, Row, run, run_many

#: seconds after which a trigger nobody claimed is taken by any triggerer with room
STALE_UNCLAIMED = 2.0

LIVE_TRIGGERERS = Query(
    "live_triggerers",
    """SELECT count(*) FROM deferrun_processes WHERE role = 'triggerer'
        AND heartbeat_at >= {now} - :dead_after""",
)
#: unclaimed triggers, counted only up to what the fair share can use (``limit`` x live
#: triggerers): counting all of them read every unclaimed row at each claim (93 ms a claim
#: with 650,000 waiting on PostgreSQL)
UNCLAIMED_UP_TO = Query(
    "unclaimed_up_to",
    """SELECT count(*) FROM (SELECT 1 FROM deferrun_triggers WHERE triggerer_id IS NULL
        ORDER BY id LIMIT :cap) AS u""",
)


#: no other triggerer holds a trigger identical to this one (its affinity group)
_NOT_HELD_ELSEWHERE = """AND (affinity IS NULL OR NOT EXISTS (SELECT 1 FROM deferrun_triggers o
                WHERE o.affinity = deferrun_triggers.affinity AND o.triggerer_id IS NOT NULL
                AND o.triggerer_id <> :triggerer_id))"""
#: this triggerer holds a trigger identical to this one: it joins that group
_HELD_HERE = """AND affinity IS NOT NULL AND EXISTS (SELECT 1 FROM deferrun_triggers o
                WHERE o.affinity = deferrun_triggers.affinity
                AND o.triggerer_id = :triggerer_id)"""


def _claim_triggers(name: str, queue_match: str, match: str = "") -> Query:
    return Query(
        name,
        f"""WITH picked AS (
            SELECT id FROM deferrun_triggers
            WHERE triggerer_id IS NULL {queue_match} AND created_at <= {{now}} - :min_age
            {match}
            ORDER BY id LIMIT :limit {{skip_locked}})
        UPDATE deferrun_triggers SET triggerer_id = :triggerer_id
        WHERE id IN (SELECT id FROM picked)
        RETURNING id, task_id, classpath, kwargs, deadline - {{now}}, affinity""",
    )


_QUEUES = "AND queue IN_TEXTS(:queues)"
CLAIM_TRIGGERS_ANY = _claim_triggers("claim_triggers_any", "")
CLAIM_TRIGGERS_QUEUES = _claim_triggers("claim_triggers_queues", _QUEUES)
CLAIM_UNSHARED_ANY = _claim_triggers("claim_unshared_any", "", _NOT_HELD_ELSEWHERE)
CLAIM_UNSHARED_QUEUES = _claim_triggers("claim_unshared_queues", _QUEUES, _NOT_HELD_ELSEWHERE)
CLAIM_GROUPS_ANY = _claim_triggers("claim_groups_any", "", _HELD_HERE)
CLAIM_GROUPS_QUEUES = _claim_triggers("claim_groups_queues", _QUEUES, _HELD_HERE)
CLAIM_LOCK = Query("claim_lock", "{claim_lock}")

RELEASE_ALL_TRIGGERS = Query(
    "release_all_triggers",
    "UPDATE deferrun_triggers SET triggerer_id = NULL WHERE triggerer_id = :triggerer_id "
    "RETURNING id",
)
RELEASE_TRIGGERS = Query(
    "release_triggers",
    "UPDATE deferrun_triggers SET triggerer_id = NULL WHERE triggerer_id = :triggerer_id "
    "AND id IN_INTS(:ids) RETURNING id",
)


def claim_triggers(
    triggerer_id: str, queues: Sequence[str], limit: int, dead_after: float
) -> Program[list[ClaimedTrigger]]:
    """Take this triggerer's fair share of new triggers, then any left waiting too long.

    New arrivals are split evenly over the live triggerers so a burst spreads over all of
    them; nothing is taken from a live triggerer, so nothing bounces. Identical triggers
    (one affinity key) stay together: a trigger whose twin another triggerer holds is left
    to that one, and every unclaimed twin of what this one holds (just claimed, or adopted
    after a failover) comes along, so a group runs as one ``run()`` (shared_runs). Only the
    2 s fallback for triggers nobody took ignores groups.

    Oldest first across queues (``ORDER BY id``, through the partial index of unclaimed
    triggers in id order): a busy queue whose name sorts first must not hold back the others'
    triggers (ordering by ``queue, id`` did, without limit). Without that index PostgreSQL
    walked the primary key past every claimed row (320 ms a claim with 345,000 claimed,
    quadratic over a large backlog).
    """
    yield run(CLAIM_LOCK)
    [(live,)] = yield run(LIVE_TRIGGERERS, dead_after=dead_after)
    [(unclaimed,)] = yield run(UNCLAIMED_UP_TO, cap=limit * max(int(live), 1))
    fair = fair_share(limit, int(unclaimed), int(live))
    extra: dict[str, Any] = {"queues": list(queues)} if queues else {}
    unshared, groups, stale = (
        (CLAIM_UNSHARED_QUEUES, CLAIM_GROUPS_QUEUES, CLAIM_TRIGGERS_QUEUES)
        if queues
        else (CLAIM_UNSHARED_ANY, CLAIM_GROUPS_ANY, CLAIM_TRIGGERS_ANY)
    )
    claimed: list[Row] = []
    if fair > 0:
        claimed += yield run(unshared, triggerer_id=triggerer_id, limit=fair, min_age=-1e9, **extra)
    if len(claimed) < limit and int(unclaimed) > len(claimed):
        claimed += yield run(
            groups, triggerer_id=triggerer_id, limit=limit - len(claimed), min_age=-1e9, **extra
        )
    if len(claimed) < limit:
        claimed += yield run(
            stale,
            triggerer_id=triggerer_id,
            limit=limit - len(claimed),
            min_age=STALE_UNCLAIMED,
            **extra,
        )
    return [ClaimedTrigger(*r) for r in claimed]


def fair_share(limit: int, unclaimed: int, live_triggerers: int) -> int:
    return max(0, min(limit, -(-unclaimed // max(live_triggerers, 1))))


def release_triggers(triggerer_id: str, ids: Sequence[int] | None) -> Program[int]:
    if ids is None:
        rows = yield run(RELEASE_ALL_TRIGGERS, triggerer_id=triggerer_id)
    elif not ids:
        return 0
    else:
        rows = yield run(RELEASE_TRIGGERS, triggerer_id=triggerer_id, ids=list(ids))
    yield Notify(("triggers",))
    return len(rows)


#: a trigger's poll health, written by the triggerer holding it (a batch, not a row per poll)
RECORD_HEALTH = Query(
    "record_trigger_health",
    "UPDATE deferrun_triggers SET poll_failures = :failures, last_error = :error, "
    "last_ok_at = :ok_at WHERE id = :id AND triggerer_id = :triggerer_id",
    many=True,
)


def record_health(
    triggerer_id: str, rows: Sequence[tuple[int, int, str | None, float | None]]
) -> Program[None]:
    yield run_many(
        RECORD_HEALTH,
        [
            {"id": tid, "failures": n, "error": error, "ok_at": ok_at, "triggerer_id": triggerer_id}
            for tid, n, error, ok_at in rows
        ],
    )
