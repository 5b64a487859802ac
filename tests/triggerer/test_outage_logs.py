"""A PostgreSQL outage under a real triggerer makes few, useful log lines: one warning when
the database becomes unreachable, one info when it is back (with the outage's length), no
error lines, no tracebacks, and no asyncpg protocol-state error (issue 24, item 7)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest

from deferrun.client import AsyncClient
from deferrun.store import open_store
from tests.support.hostile_ops import Returns
from tests.support.pgcluster import PgCluster
from tests.support.processes import Proc, deferrun_env, wait_until
from triggers.time import DateTimeTrigger

pytestmark = pytest.mark.slow

OUTAGE = 12.0  # seconds the cluster stays down: several heartbeats, claims and event writes


def _lines(proc: Proc) -> list[dict[str, Any]]:
    out = []
    for line in proc.output().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"event": line, "level": "raw"})
    return out


async def _submit_timers(url: str, at: datetime, n: int) -> None:
    store = await open_store(url)
    try:
        client = AsyncClient(store=store)
        for _ in range(n):
            await client.submit(Returns(what="ok"), start_trigger=DateTimeTrigger(moment=at))
    finally:
        await store.close()


async def _claimed(url: str) -> int:
    store = await open_store(url)
    try:
        return len([t for t in await store.list_triggers() if t.triggerer_id])
    finally:
        await store.close()


def test_postgres_outage_logs_one_warning_and_one_recovery(
    pg_cluster: PgCluster, pg_url: str, procs: Callable[..., Proc]
) -> None:
    triggerer = procs(["triggerer", "--log-level", "info"], deferrun_env(pg_url))
    wait_until(lambda: "triggerer started" in triggerer.output(), 30, message="triggerer started")
    # triggers that fire while the database is down: their events wait and are retried
    fire_at = datetime.now(UTC) + timedelta(seconds=4)
    anyio.run(_submit_timers, pg_url, fire_at, 3)
    wait_until(lambda: anyio.run(_claimed, pg_url) == 3, 20, 0.3, message="triggers claimed")
    before = len(_lines(triggerer))
    pg_cluster.stop("fast")
    try:
        wait_until(
            lambda: "database unreachable" in triggerer.output(), 20, message="outage noticed"
        )
        down_at = time.monotonic()
        wait_until(lambda: time.monotonic() - down_at > OUTAGE, OUTAGE + 5, message="outage")
    finally:
        pg_cluster.start()
    wait_until(
        lambda: "database reachable again" in triggerer.output(), 40, message="recovery logged"
    )
    triggerer.stop()
    during = _lines(triggerer)[before:]
    text = "\n".join(json.dumps(line) for line in during)
    warnings = [line for line in during if line.get("level") in ("warning", "error", "raw")]
    assert [w["event"] for w in warnings if "unreachable" in w["event"]] == [
        "database unreachable; retrying quietly until it is back"
    ], text
    assert not [line for line in during if line.get("level") == "error"], text
    assert "Traceback" not in text and "InternalClientError" not in text, text
    assert "cannot switch to state" not in text, text
    assert len(warnings) <= 3, text  # the outage, and at most a lost LISTEN connection
    [back] = [line for line in during if line["event"] == "database reachable again"]
    assert back["level"] == "info" and back["outage_seconds"] >= OUTAGE - 1, back
