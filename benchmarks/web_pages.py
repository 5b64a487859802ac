"""Status page and retention benchmark.

    python -m benchmarks.web_pages --out DIR [--backends sqlite postgres] [--rows 1000000]
                                   [--clean-rows 200000] [--resume 1000] [--spread 30] [--repeat 3]

(a) pages: --rows tasks (85 % success, the rest spread over every other state, 2 % deferred
on a trigger) are written with direct bulk SQL into the store's tables. `deferrun web`'s app
then serves each page and JSON view; each is fetched 30 times over HTTP (after one warm-up),
and the table shows the median over --repeat runs of each run's p50. The background counts
the overview reads (all states, and the cheap unfinished-states count) are timed too.
(b) retention: --clean-rows finished tasks (ended two days ago, two log lines each) are
bulk-written, a real triggerer and worker start, and --resume deferred tasks are submitted to
come due over --spread seconds (30), the first 30 s later (by then all of them have deferred;
the JSON says so). `deferrun db clean --older-than 1d` starts as the first one comes due.
Each task's resume delay (its operator's resume time minus the moment its
trigger was due) is measured, against a run of the same tasks without the clean. On SQLite the
file size and free pages are recorded after the clean and after writing as many tasks again.
Prints a table and writes DIR/web_pages.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from benchmarks._harness import (
    Process,
    add_out_argument,
    env_for,
    machine,
    pct,
    prepare_out,
    start_pg_cluster,
    table,
    write_json,
)
from benchmarks.ops import Roundtrip
from deferrun.client import build_task
from deferrun.core.models import TaskState
from deferrun.store import Store, open_store
from deferrun.web.app import build_app

STATES = [
    ("success", 85), ("failed", 5), ("skipped", 3), ("cancelled", 2), ("upstream_failed", 1),
    ("deferred", 2), ("queued", 1), ("up_for_retry", 0.5), ("running", 0.5),
]  # fmt: skip


def _state_of(i: int) -> str:
    slot = i % 200
    edge = 0.0
    for state, share in STATES:
        edge += share * 2
        if slot < edge:
            return state
    return "success"


def _rows(n: int, prefix: str, finished_ago: float | None) -> list[tuple[Any, ...]]:
    now = time.time()
    out = []
    for i in range(n):
        state = _state_of(i) if finished_ago is None else "success"
        created = now - (finished_ago or 0) - (n - i) * 0.01
        ended = created + 1 if state in ("success", "failed", "skipped", "cancelled") else None
        if state == "upstream_failed":
            ended = created + 1
        out.append(
            (
                f"{prefix}{i:09d}",
                f"job-{i % 100}",
                "benchmarks.ops.Nop",
                "{}",
                "other" if i % 10 == 0 else "default",
                state,
                1,
                1,
                300.0,
                created,
                ended or created,
                ended,
                i + 1 if state == "deferred" else None,
                "ghost-worker" if state == "running" else None,
            )
        )
    return out


LEAD = 30.0  # seconds from submitting the deferred tasks to the first one coming due

INSERT = """INSERT INTO deferrun_tasks (id, name, classpath, kwargs, queue, state, try_number,
    max_tries, retry_delay, created_at, updated_at, finished_at, trigger_id, worker_id)
    VALUES ({})"""


async def fill(store: Store, db: str, rows: list[tuple[Any, ...]], logs_per_task: int) -> None:
    """Bulk-write ``rows`` (and triggers for the deferred ones, log lines) straight into the
    store's tables: far faster than submitting them."""
    triggers = [
        (r[12], r[0], "triggers.time.DateTimeTrigger", "{}", r[4], r[9])
        for r in rows
        if r[12] is not None
    ]
    logs = [
        (r[0], r[9], "worker", f"line {k} of {r[0]}") for r in rows for k in range(logs_per_task)
    ]
    if db.startswith("sqlite"):
        conn = sqlite3.connect(db[len("sqlite:///") :])
        conn.execute("PRAGMA synchronous = OFF")
        with conn:
            conn.executemany(INSERT.format(", ".join("?" * 14)), rows)
            conn.executemany(
                "INSERT INTO deferrun_triggers (id, task_id, classpath, kwargs, queue, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                triggers,
            )
            conn.executemany(
                "INSERT INTO deferrun_task_logs (task_id, at, source, line) VALUES (?, ?, ?, ?)",
                logs,
            )
        conn.execute("ANALYZE")
        # as a long-running database would be: its rows in the file, not in a 100 MB WAL that
        # every later commit would try to checkpoint
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        return
    pool = store.connector.pool  # type: ignore[attr-defined]
    async with pool.acquire() as conn:
        columns = [
            "id", "name", "classpath", "kwargs", "queue", "state", "try_number", "max_tries",
            "retry_delay", "created_at", "updated_at", "finished_at", "trigger_id", "worker_id",
        ]  # fmt: skip
        await conn.copy_records_to_table("deferrun_tasks", records=rows, columns=columns)
        await conn.copy_records_to_table(
            "deferrun_triggers",
            records=triggers,
            columns=["id", "task_id", "classpath", "kwargs", "queue", "created_at"],
        )
        await conn.copy_records_to_table(
            "deferrun_task_logs", records=logs, columns=["task_id", "at", "source", "line"]
        )
        await conn.execute(
            "SELECT setval('deferrun_triggers_id_seq', (SELECT max(id) FROM deferrun_triggers))"
        )
        await conn.execute("ANALYZE")


async def time_pages(store: Store, samples: int = 30) -> dict[str, float]:
    """p50 (ms) of each page and view, fetched over HTTP from the real app."""
    runner = web.AppRunner(build_app(store, "bench-token"), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    base = f"http://{host}:{port}"
    out: dict[str, float] = {}
    try:
        async with aiohttp.ClientSession() as http:

            async def get(path: str) -> Any:
                async with http.get(base + path) as r:
                    assert r.status == 200, (path, r.status, await r.text())
                    return await r.read()

            page = await (await http.get(base + "/api/tasks?state=success")).json()
            second = "/tasks?state=success&page=" + page["next"]
            first = await (await http.get(base + "/api/tasks")).json()
            one = first["tasks"][0]["id"]
            paths = {
                "overview /": "/",
                "tasks /tasks": "/tasks",
                "tasks ?state=failed": "/tasks?state=failed",
                "tasks ?name=job-7": "/tasks?name=job-7",
                "tasks ?queue=other": "/tasks?queue=other",
                "tasks page 2 (cursor)": second,
                "task /tasks/{id}": f"/tasks/{one}",
                "triggers /triggers": "/triggers",
                "api /api/overview": "/api/overview",
                "api /api/tasks": "/api/tasks",
            }
            for label, path in paths.items():
                await get(path)  # warm-up (the overview's first call counts in the background)
                times = []
                for _ in range(samples):
                    t0 = time.perf_counter()
                    await get(path)
                    times.append(time.perf_counter() - t0)
                out[label] = round(pct(times, 50) * 1000, 2)
        for label, call in (
            ("background: count all states", store.count_tasks),
            ("background: count unfinished states", store.active_counts),
        ):
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                await call()
                times.append(time.perf_counter() - t0)
            out[label] = round(pct(times, 50) * 1000, 2)
    finally:
        await runner.cleanup()
    return out


async def pages_run(db: str, rows: int) -> dict[str, Any]:
    store = await open_store(db)
    try:
        t0 = time.monotonic()
        await fill(store, db, _rows(rows, "t", None), logs_per_task=0)
        filled = time.monotonic() - t0
        result = await time_pages(store)
    finally:
        await store.close()
    return {"fill_seconds": round(filled, 1), "p50_ms": result}


def sqlite_pages(path: str) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        wal = path + "-wal"
        return {
            "file_bytes": os.path.getsize(path)
            + (os.path.getsize(wal) if os.path.exists(wal) else 0),
            "page_count": conn.execute("PRAGMA page_count").fetchone()[0],
            "freelist_pages": conn.execute("PRAGMA freelist_count").fetchone()[0],
            "page_size": page_size,
        }
    finally:
        conn.close()


async def retention_run(
    db: str, clean_rows: int, resume: int, spread: float, clean: bool, workdir: Path, tag: str
) -> dict[str, Any]:
    store = await open_store(db)
    env = env_for(db, DEFERRUN_DEAD_AFTER="5")
    procs: list[Process] = []
    out: dict[str, Any] = {"clean": clean}
    try:
        await fill(store, db, _rows(clean_rows, "old", 2 * 86400), logs_per_task=2)
        path = db[len("sqlite:///") :] if db.startswith("sqlite") else None
        if path:
            out["sqlite_before"] = sqlite_pages(path)
        procs.append(Process(["triggerer"], env, workdir / f"{tag}-triggerer.log"))
        procs.append(Process(["worker", "--slots", "8"], env, workdir / f"{tag}-worker.log"))
        # every task must have run once and deferred before the first is due: 1,000 first
        # tries take a few seconds on a loaded machine, and that is not a resume delay
        start = time.time() + LEAD
        tasks = [build_task(Roundtrip(at=start + spread * i / resume)) for i in range(resume)]
        await store.submit_many(tasks)
        while time.time() < start - 0.5:
            if (await store.active_counts()).get("deferred", 0) >= resume:
                break
            await asyncio.sleep(0.2)
        out["all_deferred_before_first_due"] = (await store.active_counts()).get(
            "deferred", 0
        ) >= resume
        out["deferred_seconds_before_first_due"] = round(start - time.time(), 1)
        await asyncio.sleep(max(0.0, start - time.time()))
        cleaner = None
        if clean:
            cleaner = subprocess.Popen(
                [sys.executable, "-m", "deferrun", "db", "clean", "--older-than", "1d"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        deadline = time.monotonic() + 300
        waiting = [t.id for t in tasks]
        while waiting and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            infos = [await store.get_task(i) for i in waiting]
            waiting = [i.id for i in infos if i is not None and not i.finished]
        if cleaner is not None:
            text, _ = cleaner.communicate(timeout=600)
            out["clean_output"] = text.strip().splitlines()[-1]
        infos = [await store.get_task(t.id) for t in tasks]
        missing = [t.id for t, i in zip(tasks, infos, strict=True) if i is None]
        bad = [i.id for i in infos if i is not None and i.state is not TaskState.SUCCESS]
        delays = [i.result["resumed"] - i.result["at"] for i in infos if i and i.result]
        out.update(
            {
                "resumed": len(delays),
                "deleted_live_tasks": len(missing),
                "not_success": len(bad),
                "resume_delay_p50_ms": round(pct(delays, 50) * 1000, 1),
                "resume_delay_p99_ms": round(pct(delays, 99) * 1000, 1),
                "resume_delay_max_ms": round(max(delays) * 1000, 1),
            }
        )
        if path and clean:
            out["sqlite_after_clean"] = sqlite_pages(path)
            await fill(store, db, _rows(clean_rows, "new", 2 * 86400), logs_per_task=2)
            out["sqlite_after_refill"] = sqlite_pages(path)
    finally:
        for p in procs:
            p.stop()
        await store.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--backends", nargs="+", choices=["sqlite", "postgres"], default=["sqlite", "postgres"]
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--clean-rows", type=int, default=200_000)
    parser.add_argument("--resume", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--spread",
        type=float,
        default=30.0,
        help="seconds over which the deferred tasks come due (the clean takes about as long)",
    )
    add_out_argument(parser)
    args = parser.parse_args()
    out_dir = prepare_out(args.out)
    workdir = Path(tempfile.mkdtemp(prefix="deferrun-bench-web-"))
    result: dict[str, Any] = {"machine": machine(), "args": vars(args) | {"out": str(args.out)}}
    cluster = start_pg_cluster() if "postgres" in args.backends else None

    def new_db(backend: str, name: str) -> str:
        if backend == "postgres":
            return str(cluster.create_database())
        return f"sqlite:///{workdir / f'{name}.db'}"

    try:
        for backend in args.backends:
            runs = [
                asyncio.run(pages_run(new_db(backend, f"pages{i}"), args.rows))
                for i in range(args.repeat)
            ]
            labels = list(runs[0]["p50_ms"])
            median = {k: round(statistics.median(r["p50_ms"][k] for r in runs), 2) for k in labels}
            ret = [
                asyncio.run(
                    retention_run(
                        new_db(backend, f"ret{clean}"),
                        args.clean_rows,
                        args.resume,
                        args.spread,
                        clean,
                        workdir,
                        f"{backend}-{clean}",
                    )
                )
                for clean in (False, True)
            ]
            result[backend] = {"pages_runs": runs, "pages_median_p50_ms": median, "retention": ret}
    finally:
        if cluster is not None:
            cluster.destroy()
    path = write_json(out_dir, "web_pages", result)
    rows = []
    for backend in args.backends:
        for label, value in result[backend]["pages_median_p50_ms"].items():
            rows.append([backend, f"{label} ({args.rows:,} rows), p50", f"{value} ms"])
        for r in result[backend]["retention"]:
            what = "with db clean" if r["clean"] else "no clean (baseline)"
            rows.append(
                [
                    backend,
                    f"{args.resume} resumes, {what}: delay p50 / p99 / max",
                    f"{r['resume_delay_p50_ms']} / {r['resume_delay_p99_ms']} / "
                    f"{r['resume_delay_max_ms']} ms",
                ]
            )
            rows.append([backend, f"{what}: live tasks deleted / not success",
                         f"{r['deleted_live_tasks']} / {r['not_success']}"])  # fmt: skip
            if r.get("clean_output"):
                rows.append([backend, "clean", r["clean_output"]])
            if "sqlite_after_clean" in r:
                b, a, f = r["sqlite_before"], r["sqlite_after_clean"], r["sqlite_after_refill"]
                rows.append(
                    [
                        backend,
                        "pages in use + free: before, after clean, after refill",
                        f"{b['page_count'] - b['freelist_pages']}+{b['freelist_pages']}, "
                        f"{a['page_count'] - a['freelist_pages']}+{a['freelist_pages']}, "
                        f"{f['page_count'] - f['freelist_pages']}+{f['freelist_pages']}",
                    ]
                )
    print(f"\ndeferrun status page and retention ({result['machine']['cores']} cores)\n")
    print(table(["backend", "measure", "value"], rows))
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
