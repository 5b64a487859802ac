"""Bytes per live distinct user coroutine trigger in a triggerer, and where they go.

    python -m benchmarks.trigger_memory --out DIR [--sizes 10000,100000]
                                        [--loops asyncio,uvloop] [--top 30]

For each size and loop, in a fresh process: a ``Triggerer`` (no database calls) starts N
distinct ``benchmarks.ops.SleepUntilTrigger`` rows through ``Triggerer._start`` (the path a
claim takes), lets each reach its ``asyncio.sleep``, and compares tracemalloc snapshots taken
before and after: bytes per trigger in all, and per allocation site (grouped by traceback).
The real-process figure is ``triggerer_scale --mode burst --distinct`` (RSS, which also counts
the allocator's slack). Writes DIR/trigger_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks._harness import REPO, add_out_argument, machine, prepare_out, table, write_json

CLASSPATH = "benchmarks.ops.SleepUntilTrigger"


def _rows(start: int, n: int, at: float) -> list[Any]:
    from deferrun.core import trigger_keys as sharing
    from deferrun.core.models import ClaimedTrigger

    rows = []
    for i in range(start, start + n):
        classpath = "".join(CLASSPATH)  # a string of its own per row, as a database row has
        kwargs = json.dumps({"at": at, "seq": i})
        task_id = f"{i:08d}-0000-4000-8000-000000000000"  # the length of a uuid4 task id
        affinity = sharing.affinity_key(classpath, kwargs)
        rows.append(ClaimedTrigger(i, task_id, classpath, kwargs, None, affinity))
    return rows


async def _measure(n: int, top: int) -> dict[str, Any]:
    import asyncio
    import gc
    import time
    import tracemalloc

    from deferrun.process import containment
    from deferrun.process.watchdog import LoopWatchdog
    from deferrun.store import open_store
    from deferrun.triggerer.triggerer import Triggerer

    store = await open_store(f"sqlite:///{Path(tempfile.mkdtemp()) / 'unused.db'}")
    triggerer = Triggerer(store, capacity=n + 1000)
    containment.install()
    triggerer.watchdog = LoopWatchdog.for_current_loop(0.2)
    at = time.time() + 3600
    for row in _rows(0, 200, at):  # warm up: caches and tables that are paid once
        triggerer._start(row)
    for _ in range(5):
        await asyncio.sleep(0)
    gc.collect()
    tracemalloc.start(3)
    before = tracemalloc.take_snapshot()
    start_bytes = tracemalloc.get_traced_memory()[0]
    batch = _rows(1000, n, at)
    for row in batch:
        triggerer._start(row)
    del batch, row
    for _ in range(5):  # each trigger runs to its asyncio.sleep
        await asyncio.sleep(0)
    gc.collect()
    total = tracemalloc.get_traced_memory()[0] - start_bytes
    after = tracemalloc.take_snapshot()
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    stats = after.filter_traces(ignore).compare_to(before.filter_traces(ignore), "traceback")
    sites = [
        {
            "bytes": round(s.size_diff / n),
            "objects": round(s.count_diff / n, 2),
            "site": " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in s.traceback),
        }
        for s in stats[:top]
        if abs(s.size_diff) / n >= 8
    ]
    loop = "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else ""
    return {
        "n": n,
        "loop": loop or "asyncio",
        "bytes_per_trigger": round(total / n),
        "sites": sites,
    }


def _child(n: int, loop: str, top: int) -> None:
    import asyncio

    if loop == "uvloop":
        import uvloop

        result = uvloop.run(_measure(n, top))
    else:
        result = asyncio.new_event_loop().run_until_complete(_measure(n, top))
    print(json.dumps(result), flush=True)
    os._exit(0)  # skip cancelling N triggers at exit: nothing is measured there


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--loops", default="asyncio,uvloop")
    parser.add_argument("--top", type=int, default=30, help="allocation sites kept per run")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    add_out_argument(parser)
    args = parser.parse_args()
    if args.child:
        _child(int(args.child[0]), args.child[1], args.top)
        return
    out_dir = prepare_out(args.out)
    runs = []
    for loop in args.loops.split(","):
        for n in [int(x) for x in args.sizes.split(",")]:
            cmd = [sys.executable, "-m", "benchmarks.trigger_memory", "--child", str(n), loop]
            cmd += ["--top", str(args.top), "--out", str(out_dir)]
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"trigger_memory {loop} N={n} failed:\n{done.stderr[-2000:]}")
            run = json.loads(done.stdout.strip().splitlines()[-1])
            runs.append(run)
            print(f"  {loop} N={n}: {run['bytes_per_trigger']} B per trigger", flush=True)
    path = write_json(out_dir, "trigger_memory", {"machine": machine(), "runs": runs})
    print(f"\nbytes per live distinct coroutine trigger ({machine()['cores']} cores)\n")
    print(
        table(
            ["loop", "N", "B/trigger"], [[r["loop"], r["n"], r["bytes_per_trigger"]] for r in runs]
        )
    )
    print("\nlargest sites, first run:\n")
    print(
        table(
            ["B", "objects", "site"],
            [[s["bytes"], s["objects"], s["site"]] for s in runs[0]["sites"]],
        )
    )
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
