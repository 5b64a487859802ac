"""Full-cycle benchmark: submit -> defer -> fire -> resume -> success, with real processes.

    python -m benchmarks.cycle --out DIR [--db URL] [--tasks 1000] [--latency-tasks 300]
                               [--live 10000] [--workers 1] [--bulk]

Measures, against one `deferrun triggerer` and ``--workers`` `deferrun worker --slots 8`:
- event->resume latency (trigger yields -> resume method starts), p50/p95/p99;
- full-cycle throughput for --tasks tasks whose triggers fire at once, from the first submit
  to the last success; the submit time is given apart (tasks are submitted one by one, or
  with ``--bulk`` in batches of 1,000), and so is the rate from the end of submitting;
- triggerer RSS with --live general (coroutine) triggers waiting, above its idle RSS (time
  triggers are far cheaper, see benchmarks/triggerer_scale.py).
Prints a table and writes DIR/cycle-<backend>.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from benchmarks._harness import (
    DbWatch,
    Process,
    add_out_argument,
    database_cpu_seconds,
    env_for,
    machine,
    prepare_out,
    start_pg_cluster,
    summary_ms,
    table,
    wait_for,
    write_json,
)
from benchmarks.ops import Roundtrip
from deferrun.client import AsyncClient, build_task
from deferrun.store import open_store


async def _submit_all(db: str, ops: list[Roundtrip], bulk: bool = False) -> list[str]:
    store = await open_store(db)
    try:
        ids = []
        if bulk:
            tasks = [build_task(op) for op in ops]
            for i in range(0, len(tasks), 1000):
                await store.submit_many(tasks[i : i + 1000])
            return [t.id for t in tasks]
        for op in ops:
            task = build_task(op)
            await store.submit(task)
            ids.append(task.id)
        return ids
    finally:
        await store.close()


async def _last_finished(store: Any, n: int) -> float:
    infos = await store.list_tasks(limit=n)
    return max(i.finished_at.timestamp() for i in infos if i.finished_at is not None)


async def _results(db: str, ids: list[str]) -> list[Any]:
    async with AsyncClient(db) as client:
        return [await client.get(i) for i in ids]


async def _owned_triggers(db: str) -> int:
    store = await open_store(db)
    try:
        return sum(1 for t in await store.list_triggers() if t.triggerer_id)
    finally:
        await store.close()


def run(
    db: str,
    tasks: int,
    latency_tasks: int,
    live: int,
    slots: int,
    workdir: Path,
    workers: int = 1,
    bulk: bool = False,
) -> dict:
    env = env_for(db)
    triggerer = Process(
        ["triggerer", "--capacity", str(max(live, tasks) + 100)], env, workdir / "triggerer.log"
    )
    worker_procs = [
        Process(["worker", "--slots", str(slots)], env, workdir / f"worker-{i}.log")
        for i in range(workers)
    ]
    out: dict[str, Any] = {
        "machine": machine(),
        "db": db.split(":")[0],
        "slots": slots,
        "workers": workers,
    }
    watch = DbWatch(db)
    try:
        time.sleep(2.0)
        out["triggerer_idle_rss_mib"] = round(triggerer.rss_mib(), 1)

        # 1. event -> resume latency: events spread out (100/s) so we see latency, not queueing
        start = time.time() + 2.0
        ops = [Roundtrip(at=start + i * 0.01) for i in range(latency_tasks)]
        ids = anyio.run(_submit_all, db, ops)
        wait_for(lambda: watch.counts().get("success", 0) >= latency_tasks, 120)
        infos = anyio.run(_results, db, ids)
        lat = [i.result["resumed"] - i.result["fired"] for i in infos]
        late = [i.result["fired"] - i.result["at"] for i in infos]
        out["event_to_resume"] = summary_ms(lat)
        out["fire_lateness"] = summary_ms(late)

        # 2. full-cycle throughput: every trigger fires as soon as it runs
        base = watch.counts().get("success", 0)
        ops = [Roundtrip(at=0) for _ in range(tasks)]
        procs = [triggerer, *worker_procs]
        cpu0 = [p.cpu_seconds() for p in procs]
        db_cpu0 = database_cpu_seconds(db)
        t0, t0_epoch = time.perf_counter(), time.time()
        anyio.run(_submit_all, db, ops, bulk)
        submitted = time.perf_counter() - t0
        # polled gently (each poll is database work too); the end is the last task's own
        # finished_at, so the poll interval does not blur the figure
        wait_for(lambda: watch.counts().get("success", 0) >= base + tasks, 600, 0.25)
        elapsed = watch.call(_last_finished, tasks) - t0_epoch
        cpu = [round(p.cpu_seconds() - c, 2) for p, c in zip(procs, cpu0, strict=True)]
        db_cpu1 = database_cpu_seconds(db)
        out["cycle"] = {
            "tasks": tasks,
            "bulk_submit": bulk,
            "seconds": round(elapsed, 2),
            "tasks_per_second": round(tasks / elapsed, 1),
            "submit_seconds": round(submitted, 2),
            # from the end of submitting to the last success: what the runtime does alone
            "seconds_after_submit": round(elapsed - submitted, 2),
            "cpu_s_triggerer": cpu[0],
            "cpu_s_workers": cpu[1:],
            # the PostgreSQL cluster's own processes (None on SQLite)
            "cpu_s_database": None
            if db_cpu0 is None or db_cpu1 is None
            else round(db_cpu1 - db_cpu0, 2),
        }

        # 3. triggerer memory with many live time triggers
        if live:
            cpu0 = triggerer.cpu_seconds()
            t0 = time.perf_counter()
            far = time.time() + 3600
            anyio.run(_submit_all, db, [Roundtrip(at=far) for _ in range(live)])
            wait_for(lambda: anyio.run(_owned_triggers, db) >= live, 900, 1.0)
            defer_elapsed = time.perf_counter() - t0
            time.sleep(3.0)
            rss = triggerer.rss_mib()
            cpu1 = triggerer.cpu_seconds()
            time.sleep(5.0)
            idle_cpu = (triggerer.cpu_seconds() - cpu1) / 5.0
            out["live_triggers"] = {
                "count": live,
                "submit_to_all_claimed_seconds": round(defer_elapsed, 1),
                "triggerer_rss_mib": round(rss, 1),
                "rss_above_idle_mib": round(rss - out["triggerer_idle_rss_mib"], 1),
                "kib_per_trigger": round((rss - out["triggerer_idle_rss_mib"]) * 1024 / live, 2),
                "triggerer_cpu_while_waiting_pct": round(idle_cpu * 100, 1),
                "triggerer_cpu_seconds_to_load": round(cpu1 - cpu0, 1),
            }
    finally:
        watch.close()
        t0 = time.perf_counter()
        triggerer.stop()
        out["triggerer_shutdown_seconds"] = round(time.perf_counter() - t0, 2)
        for worker in worker_procs:
            worker.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", help="database URL (default: a fresh one for --backend)")
    parser.add_argument(
        "--backend",
        choices=["sqlite", "postgres"],
        default="sqlite",
        help="postgres starts a throwaway PostgreSQL cluster in a temp dir",
    )
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--latency-tasks", type=int, default=300)
    parser.add_argument("--live", type=int, default=10000)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument(
        "--bulk", action="store_true", help="submit in batches of 1,000 instead of one by one"
    )
    add_out_argument(parser)
    args = parser.parse_args()
    out_dir = prepare_out(args.out)
    workdir = Path(tempfile.mkdtemp(prefix="deferrun-bench-"))
    cluster = None
    if args.db:
        db = args.db
    elif args.backend == "postgres":
        cluster = start_pg_cluster()
        db = cluster.create_database()
    else:
        db = f"sqlite:///{workdir / 'bench.db'}"
    try:
        out = run(
            db,
            args.tasks,
            args.latency_tasks,
            args.live,
            args.slots,
            workdir,
            workers=args.workers,
            bulk=args.bulk,
        )
    finally:
        if cluster is not None:
            cluster.destroy()
    path = write_json(out_dir, f"cycle-{out['db']}", out)
    rows = [
        [
            "event->resume p50 / p95 / p99",
            f"{out['event_to_resume']['p50_ms']} / "
            f"{out['event_to_resume']['p95_ms']} / {out['event_to_resume']['p99_ms']} ms",
        ],
        [
            "fire lateness p50 / p99",
            f"{out['fire_lateness']['p50_ms']} / {out['fire_lateness']['p99_ms']} ms",
        ],
        [
            f"full cycle, {out['cycle']['tasks']} tasks",
            f"{out['cycle']['tasks_per_second']} tasks/s ({out['cycle']['seconds']} s, of "
            f"which submitting {out['cycle']['submit_seconds']} s)",
        ],
        [
            "CPU s triggerer / workers / database",
            f"{out['cycle']['cpu_s_triggerer']} / {out['cycle']['cpu_s_workers']} / "
            f"{out['cycle'].get('cpu_s_database', '-')}",
        ],
        ["triggerer idle RSS", f"{out['triggerer_idle_rss_mib']} MiB"],
    ]
    if "live_triggers" in out:
        lt = out["live_triggers"]
        rows += [
            [
                f"triggerer RSS, {lt['count']} live coroutine triggers",
                f"{lt['triggerer_rss_mib']} MiB (+{lt['rss_above_idle_mib']} MiB, "
                f"{lt['kib_per_trigger']} KiB/trigger)",
            ],
            ["triggerer CPU while waiting", f"{lt['triggerer_cpu_while_waiting_pct']} %"],
            [
                f"submit -> {lt['count']} triggers claimed",
                f"{lt['submit_to_all_claimed_seconds']} s",
            ],
        ]
    rows.append(["triggerer SIGTERM -> exit", f"{out['triggerer_shutdown_seconds']} s"])
    print(
        f"\ndeferrun full cycle on {out['db']} ({out['machine']['cores']} cores, "
        f"{out['workers']} x worker --slots {out['slots']})\n"
    )
    print(table(["measure", "value"], rows))
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
