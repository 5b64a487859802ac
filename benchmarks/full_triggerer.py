"""Idle CPU of a triggerer at capacity vs one with capacity to spare.

    python -m benchmarks.full_triggerer --out DIR [--triggers 1000] [--window 10]

One real `deferrun triggerer` (SQLite) holds ``--triggers`` live triggers that fire in an
hour, once with ``--capacity`` equal to that number (full: nothing left to claim into) and
once with twice it (spare). After all are claimed and a few seconds pass, its CPU time is
read ``--window`` seconds apart. A full triggerer used to spin at a whole core (its claim
loop's next claim time lay in the past); it must idle like one with spare capacity.
Writes DIR/full_triggerer.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from benchmarks._harness import (
    Process,
    add_out_argument,
    env_for,
    free_port,
    machine,
    prepare_out,
    table,
    wait_for,
    write_json,
)
from benchmarks.ops import Nop, SleepUntilTrigger
from benchmarks.triggerer_scale import gauge, scrape
from deferrun.client import build_task
from deferrun.store import open_store
from triggers.time import DateTimeTrigger


async def _submit(db: str, n: int, kind: str) -> None:
    from datetime import UTC, datetime

    at = time.time() + 3600
    store = await open_store(db)
    try:
        tasks = [
            build_task(
                Nop(),
                start_trigger=(
                    DateTimeTrigger(moment=datetime.fromtimestamp(at + i, UTC))
                    if kind == "timer"
                    else SleepUntilTrigger(at=at + i, seq=i)
                ),
            )
            for i in range(n)
        ]
        for i in range(0, n, 2000):
            await store.submit_many(tasks[i : i + 2000])
    finally:
        await store.close()


def run_one(n: int, capacity: int, kind: str, window: float, workdir: Path) -> dict[str, Any]:
    db = f"sqlite:///{workdir}/full-{kind}-{capacity}.db"
    anyio.run(_submit, db, n, kind)
    port = free_port()
    proc = Process(
        [
            "triggerer",
            "--capacity",
            str(capacity),
            "--metrics-port",
            str(port),
            "--metrics-host",
            "127.0.0.1",
        ],
        env_for(db, DEFERRUN_IMPORTS="benchmarks.ops"),
        workdir / f"triggerer-{kind}-{capacity}.log",
    )
    try:
        running = lambda: gauge(scrape(port), "deferrun_triggers_running") or 0  # noqa: E731
        wait_for(lambda: running() >= n, 300, 0.3)
        time.sleep(3.0)  # past the last claim's 1 s follow-up look
        cpu0, t0 = proc.cpu_seconds(), time.monotonic()
        time.sleep(window)
        cpu = (proc.cpu_seconds() - cpu0) / (time.monotonic() - t0)
    finally:
        proc.stop()
    return {
        "triggers": n,
        "capacity": capacity,
        "kind": kind,
        "full": capacity == n,
        "idle_cpu_pct": round(cpu * 100, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--triggers", type=int, default=1000, help="live triggers held")
    parser.add_argument("--window", type=float, default=10.0, help="seconds of CPU counted")
    parser.add_argument("--kinds", default="timer,run", help="timer (built-in), run (user)")
    add_out_argument(parser)
    args = parser.parse_args()
    out_dir = prepare_out(args.out)
    workdir = Path(tempfile.mkdtemp(prefix="deferrun-full-"))
    rows = []
    for kind in args.kinds.split(","):
        for capacity in (args.triggers, 2 * args.triggers):
            row = run_one(args.triggers, capacity, kind, args.window, workdir)
            rows.append(row)
            print(f"  {row}", flush=True)
    path = write_json(out_dir, "full_triggerer", {"machine": machine(), "runs": rows})
    print("\nidle triggerer CPU, full vs spare capacity (SQLite)\n")
    print(
        table(
            ["triggers", "kind", "capacity", "state", "idle CPU"],
            [
                [
                    r["triggers"],
                    r["kind"],
                    r["capacity"],
                    "full" if r["full"] else "spare",
                    f"{r['idle_cpu_pct']} %",
                ]
                for r in rows
            ],
        )
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
