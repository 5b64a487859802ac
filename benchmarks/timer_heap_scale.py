"""A million time triggers in one triggerer: the timer heap's memory and timekeeping.

    python -m benchmarks.triggerer_scale --mode heap --out DIR [--sizes 1000000]
                                         [--fire-rate 5000] [--measure 30]

In this process, not through the database: N claimed ``DateTimeTrigger`` rows are started by a
real ``Triggerer`` (``_start_one``, the claim path: rebuild, ``timer()``, heap entry, the same
gc freeze), their moments spread so that ``--fire-rate`` of them come due per second. Reported:
RSS with all N loaded (and per timer above the idle RSS), load rate, then over ``--measure``
seconds of firing the fire lateness p50/p99 (when the timer loop popped each one minus its
moment, what ``deferrun_timer_fire_lateness_seconds`` measures) and the CPU it took. Outcomes
stop at the event writer (nothing is stored), so this is the triggerer's side alone; the full
path through a database is ``--mode timers`` (whose load, 1M tasks through a worker, takes
far longer than this machine's budget).
"""

from __future__ import annotations

import asyncio
import gc
import os
import tempfile
import time
from datetime import UTC, datetime
from typing import Any

from benchmarks._harness import pct
from deferrun.core import serialization
from deferrun.core.models import ClaimedTrigger
from deferrun.store import open_store
from deferrun.triggerer.triggerer import Triggerer
from triggers.time import DateTimeTrigger

CLAIM_BATCH = 10_000


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def _run(n: int, fire_rate: float, measure: float, db: str) -> dict[str, Any]:
    store = await open_store(db)
    try:
        t = Triggerer(store, capacity=n + 10)
        classpath, _ = DateTimeTrigger(moment=datetime.now(UTC)).serialize()
        gc.collect()
        idle = _rss_mib()
        cpu0, t0 = time.process_time(), time.perf_counter()
        start = time.time() + 5.0 + n / 30_000  # after the load, on a guessed load rate
        for lo in range(0, n, CLAIM_BATCH):
            batch = [
                ClaimedTrigger(
                    i + 1,
                    f"task-{i:012d}",
                    classpath,
                    serialization.dumps(
                        {"moment": datetime.fromtimestamp(start + i / fire_rate, UTC)}
                    ),
                    None,
                )
                for i in range(lo, min(n, lo + CLAIM_BATCH))
            ]
            for claimed in batch:
                t._start_one(claimed)
            del batch
            t._freezer.loaded(len(t.running))  # as the claim loop does after each claim
            await asyncio.sleep(0)
        load_s, load_cpu = time.perf_counter() - t0, time.process_time() - cpu0
        loaded_in_time = time.time() < start
        gc.collect()
        loaded = _rss_mib()
        late: list[float] = []
        pop_due = t.timers.pop_due

        def timed_pop(now: float, limit: int = 10_000) -> list[Any]:
            due = pop_due(now, limit)
            late.extend(now - timer.due for timer in due)
            return due

        t.timers.pop_due = timed_pop  # type: ignore[method-assign]
        t.writer.put = lambda outcome: True  # type: ignore[method-assign]
        loop_task = asyncio.get_running_loop().create_task(t._timer_loop())
        await asyncio.sleep(max(start - time.time(), 0))
        cpu1 = time.process_time()
        await asyncio.sleep(measure)
        fire_cpu = time.process_time() - cpu1
        loop_task.cancel()
        return {
            "mode": "heap",
            "n": n,
            "loaded_before_first_moment": loaded_in_time,
            "load_seconds": round(load_s, 1),
            "load_cpu_seconds": round(load_cpu, 1),
            "load_rate_per_s": round(n / load_s),
            "idle_rss_mib": round(idle, 1),
            "rss_mib": round(loaded, 1),
            "bytes_per_timer": round((loaded - idle) * 2**20 / n),
            "fire_rate_target": fire_rate,
            "fired": len(late),
            "fired_per_s": round(len(late) / measure),
            "fire_lateness_p50_ms": round(pct(late, 50) * 1000, 2),
            "fire_lateness_p99_ms": round(pct(late, 99) * 1000, 2),
            "fire_lateness_max_ms": round(max(late, default=0.0) * 1000, 2),
            "fire_cpu_pct": round(100 * fire_cpu / measure, 1),
            "rss_after_mib": round(_rss_mib(), 1),
        }
    finally:
        await store.close()


def run_heap(n: int, fire_rate: float, measure: float) -> dict[str, Any]:
    """One in-process run (a fresh SQLite file only for the Triggerer's construction)."""
    db = f"sqlite:///{tempfile.mkdtemp(prefix='deferrun-heap-')}/heap-{os.getpid()}.db"
    return asyncio.run(_run(n, fire_rate, measure, db))


HEADERS = ["N", "load/s", "RSS MiB", "B/timer", "fired/s", "lateness p50/p99/max ms", "CPU %"]


def rows_for_table(rows: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            r["n"],
            r["load_rate_per_s"],
            r["rss_mib"],
            r["bytes_per_timer"],
            r["fired_per_s"],
            f"{r['fire_lateness_p50_ms']} / {r['fire_lateness_p99_ms']} / "
            f"{r['fire_lateness_max_ms']}",
            r["fire_cpu_pct"],
        ]
        for r in rows
    ]
