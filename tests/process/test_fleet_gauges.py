"""The fleet gauges the alert rules read come from cheap database reads (both backends)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio
import pytest

from deferrun.client import AsyncClient
from deferrun.process.metrics import CountingStore, Metrics
from deferrun.store import Store
from tests.support.hostile_ops import Returns
from triggers.time import DateTimeTrigger

pytestmark = pytest.mark.anyio


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    assert value is not None, name
    return value


async def test_fleet_gauges_show_waiting_triggers_queued_tasks_and_live_processes(
    store: Store,
) -> None:
    metrics = Metrics()
    counted = CountingStore(store, metrics)
    assert metrics.fleet_store is counted
    await metrics.refresh_fleet()
    assert _value(metrics, "deferrun_oldest_unclaimed_trigger_age_seconds") == 0
    assert _value(metrics, "deferrun_oldest_trigger_age_seconds") == 0
    assert _value(metrics, "deferrun_live_processes", role="triggerer") == 0

    client = AsyncClient(store=store)
    later = DateTimeTrigger(moment=datetime.now(UTC) + timedelta(hours=1))
    await client.submit(Returns(what="ok"), start_trigger=later)
    await client.submit(Returns(what="ok"))
    await store.register_process("w-1", "worker", ["default"], 4)
    with anyio.fail_after(10):
        while True:
            await metrics.refresh_fleet()
            if _value(metrics, "deferrun_oldest_unclaimed_trigger_age_seconds") > 0.2:
                break
            await anyio.sleep(0.1)
    assert _value(metrics, "deferrun_oldest_trigger_age_seconds") > 0.2
    assert _value(metrics, "deferrun_oldest_queued_task_age_seconds") > 0
    assert _value(metrics, "deferrun_live_processes", role="worker") == 1
    assert _value(metrics, "deferrun_live_processes", role="triggerer") == 0
    assert _value(metrics, "deferrun_dead_after_seconds") > 0
