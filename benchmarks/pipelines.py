"""Pipelines benchmark: fan-out release and chain overhead, with real deferrun processes.

    python -m benchmarks.pipelines --out DIR [--backends sqlite postgres] [--fanout 10000]
                                   [--chain 1000] [--repeat 3] [--window 5]

(a) fan-out: --fanout tasks submitted after one upstream (on a queue no worker serves, so they
stay ``queued`` once released). The upstream starts from a FileTrigger the harness fires.
Measures the time from the upstream's success (its finished_at) to all of them queued, both
inside the database (latest waiter's updated_at) and as a client polling every 5 ms sees it;
and the database calls the worker and triggerer made (deferrun_store_calls_total, scraped from
--metrics-port) during a --window of seconds while they waited, against an idle window
before they were submitted: the difference is what the waiters cost while waiting.
(b) chain: --chain tasks each after the previous, run by a worker and a triggerer; per-link
overhead = downstream started_at (claimed, running) - upstream finished_at, p50/p95.
Each is run --repeat times on a fresh database; the table shows medians.
Prints a table and writes DIR/pipelines.json.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import anyio

from benchmarks._harness import (
    Process,
    add_out_argument,
    env_for,
    free_port,
    machine,
    pct,
    prepare_out,
    start_pg_cluster,
    table,
    wait_for,
    write_json,
)
from benchmarks.burst import store_calls
from benchmarks.ops import Nop
from deferrun.client import build_task
from deferrun.core.models import NewTask
from deferrun.store import Store, open_store
from deferrun.store.sql import Query
from triggers.file import FileTrigger

FANOUT_QUEUE = "bench-fanout"  # no worker serves it: released waiters stay queued
QUEUED_IN = Query(
    "bench_queued_in",
    "SELECT count(*), max(updated_at) FROM deferrun_tasks WHERE queue = :queue "
    "AND state = 'queued'",
)
CHAIN_TIMES = Query(
    "bench_chain_times",
    "SELECT id, state, started_at, finished_at FROM deferrun_tasks WHERE id IN_TEXTS(:ids)",
)


async def _submit(db: str, tasks: list[NewTask], chunk: int = 500) -> None:
    store = await open_store(db)
    try:
        for i in range(0, len(tasks), chunk):
            await store.submit_many(tasks[i : i + chunk])
    finally:
        await store.close()


def _store_calls(port: int) -> dict[str, float]:
    """deferrun_store_calls_total by method, from one process's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return store_calls(resp.read().decode())


def _calls(ports: list[int]) -> dict[str, float]:
    total: dict[str, float] = {}
    for port in ports:
        for method, n in _store_calls(port).items():
            total[method] = total.get(method, 0.0) + n
    return total


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, int]:
    return {m: int(after[m] - before.get(m, 0.0)) for m in sorted(after)}


def _window(ports: list[int], seconds: float) -> dict[str, int]:
    before = _calls(ports)
    time.sleep(seconds)
    return _delta(_calls(ports), before)


def _processes(db: str, workdir: Path, tag: str) -> tuple[list[Process], list[int]]:
    ports = [free_port(), free_port()]
    env = env_for(db)
    metrics = ["--metrics-host", "127.0.0.1", "--metrics-port"]
    procs = [
        Process(["worker", "--slots", "4", *metrics, str(ports[0])], env, workdir / f"w-{tag}.log"),
        Process(["triggerer", *metrics, str(ports[1])], env, workdir / f"t-{tag}.log"),
    ]

    def ready() -> bool:
        try:
            _calls(ports)
            return True
        except OSError:
            return False

    wait_for(ready, 60, 0.1)
    return procs, ports


def _gated_start(gate: Path) -> NewTask:
    return build_task(
        Nop(task_id="start"), start_trigger=FileTrigger(str(gate), poll_interval=0.02)
    )


async def _poll_released(db: str, n: int, up_id: str, timeout: float) -> dict[str, float]:
    store: Store = await open_store(db)
    try:
        db_conn: Any = store.db  # type: ignore[attr-defined]
        with anyio.fail_after(timeout):
            while True:
                [(count, latest)] = await db_conn.fetch(QUEUED_IN, queue=FANOUT_QUEUE)
                if int(count) >= n:
                    seen = time.time()
                    break
                await anyio.sleep(0.005)
        up = await store.get_task(up_id)
        assert up is not None and up.finished_at is not None, up
        done = up.finished_at.timestamp()
        return {
            "in_database_ms": round((float(latest) - done) * 1000, 1),
            "observed_ms": round((seen - done) * 1000, 1),
        }
    finally:
        await store.close()


def fanout(db: str, n: int, window: float, workdir: Path, tag: str) -> dict[str, Any]:
    gate = workdir / f"gate-{tag}"
    procs, ports = _processes(db, workdir, f"fanout-{tag}")
    try:
        # the upstream waits on its trigger in both windows: only the waiters differ
        up = _gated_start(gate)
        anyio.run(_submit, db, [up])
        wait_for(lambda: _calls(ports).get("claim_triggers", 0) >= 1, 30, 0.05)
        idle = _window(ports, window)
        waiters = [build_task(Nop(queue=FANOUT_QUEUE), after=[up.id]) for _ in range(n)]
        t0 = time.perf_counter()
        anyio.run(_submit, db, waiters)
        submit_s = time.perf_counter() - t0
        waiting = _window(ports, window)
        gate.write_text("go")
        released = anyio.run(_poll_released, db, n, up.id, 120.0)
    finally:
        for p in procs:
            p.stop()
    extra = {m: waiting.get(m, 0) - idle.get(m, 0) for m in sorted(set(idle) | set(waiting))}
    return {
        "n": n,
        "submit_seconds": round(submit_s, 2),
        **released,
        "window_seconds": window,
        "store_calls_idle_window": idle,
        "store_calls_waiting_window": waiting,
        "store_calls_difference": extra,
        "store_calls_idle_total": sum(idle.values()),
        "store_calls_waiting_total": sum(waiting.values()),
    }


async def _chain_times(db: str, ids: list[str]) -> list[tuple[str, str, float, float]]:
    store = await open_store(db)
    try:
        rows = await store.db.fetch(CHAIN_TIMES, ids=ids)  # type: ignore[attr-defined]
        return [(r[0], r[1], r[2], r[3]) for r in rows]
    finally:
        await store.close()


def chain(db: str, n: int, workdir: Path, tag: str) -> dict[str, Any]:
    gate = workdir / f"chain-gate-{tag}"
    tasks = [_gated_start(gate)]
    for _ in range(n - 1):
        tasks.append(build_task(Nop(task_id="link"), after=[tasks[-1].id]))
    ids = [t.id for t in tasks]
    procs, _ = _processes(db, workdir, f"chain-{tag}")
    try:
        anyio.run(_submit, db, tasks)
        t0 = time.perf_counter()
        gate.write_text("go")

        def last_done() -> bool:
            [(_, state, _, _)] = anyio.run(_chain_times, db, ids[-1:])
            return state == "success"

        wait_for(last_done, 600, 0.2)
        elapsed = time.perf_counter() - t0
    finally:
        for p in procs:
            p.stop()
    rows = {r[0]: r for r in anyio.run(_chain_times, db, ids)}
    assert all(r[1] == "success" for r in rows.values()), "a chain link did not succeed"
    links = [rows[b][2] - rows[a][3] for a, b in itertools.pairwise(ids)]
    first_to_last = rows[ids[-1]][3] - rows[ids[0]][2]
    ms = [v * 1000 for v in links]
    return {
        "n": n,
        "link_p50_ms": round(pct(ms, 50), 2),
        "link_p95_ms": round(pct(ms, 95), 2),
        "link_max_ms": round(max(ms), 2),
        "first_start_to_last_end_seconds": round(first_to_last, 2),
        "gate_to_done_seconds": round(elapsed, 2),
    }


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--backends", nargs="+", choices=["sqlite", "postgres"], default=["sqlite", "postgres"]
    )
    parser.add_argument("--fanout", type=int, default=10_000)
    parser.add_argument("--chain", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--window",
        type=float,
        default=5.0,
        help="seconds of store-call counting, idle and while waiting",
    )
    add_out_argument(parser)
    args = parser.parse_args()
    out_dir = prepare_out(args.out)
    workdir = Path(tempfile.mkdtemp(prefix="deferrun-bench-pipes-"))
    result: dict[str, Any] = {"machine": machine(), "repeat": args.repeat, "backends": {}}
    cluster = start_pg_cluster() if "postgres" in args.backends else None
    try:
        for backend in args.backends:
            fan, chn = [], []
            for i in range(args.repeat):
                for kind in ("fanout", "chain"):
                    if backend == "postgres":
                        db = cluster.create_database()
                    else:
                        db = f"sqlite:///{workdir / f'{kind}-{i}.db'}"
                    if kind == "fanout":
                        fan.append(fanout(db, args.fanout, args.window, workdir, f"{backend}{i}"))
                    else:
                        chn.append(chain(db, args.chain, workdir, f"{backend}{i}"))
            result["backends"][backend] = {
                "fanout_runs": fan,
                "chain_runs": chn,
                "median": {
                    "fanout_in_database_ms": _median(fan, "in_database_ms"),
                    "fanout_observed_ms": _median(fan, "observed_ms"),
                    "fanout_idle_store_calls": _median(fan, "store_calls_idle_total"),
                    "fanout_waiting_store_calls": _median(fan, "store_calls_waiting_total"),
                    "fanout_submit_seconds": _median(fan, "submit_seconds"),
                    "chain_link_p50_ms": _median(chn, "link_p50_ms"),
                    "chain_link_p95_ms": _median(chn, "link_p95_ms"),
                    "chain_seconds": _median(chn, "first_start_to_last_end_seconds"),
                },
            }
    finally:
        if cluster is not None:
            cluster.destroy()
    path = write_json(out_dir, "pipelines", result)
    rows = []
    for backend, data in result["backends"].items():
        m = data["median"]
        fan_n, chain_n = args.fanout, args.chain
        rows += [
            [
                backend,
                f"fan-out {fan_n}: upstream success -> all queued (in database)",
                f"{m['fanout_in_database_ms']} ms",
            ],
            [
                backend,
                f"fan-out {fan_n}: upstream success -> all queued (client sees)",
                f"{m['fanout_observed_ms']} ms",
            ],
            [
                backend,
                f"fan-out {fan_n}: store calls in {args.window:g} s, idle / while waiting",
                f"{m['fanout_idle_store_calls']:g} / {m['fanout_waiting_store_calls']:g}",
            ],
            [
                backend,
                f"chain {chain_n}: link overhead p50 / p95",
                f"{m['chain_link_p50_ms']} / {m['chain_link_p95_ms']} ms",
            ],
            [backend, f"chain {chain_n}: first start -> last end", f"{m['chain_seconds']} s"],
        ]
    print(
        f"\ndeferrun pipelines ({result['machine']['cores']} cores, medians of {args.repeat} "
        "runs)\n"
    )
    print(table(["backend", "measure", "value"], rows))
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
