"""The midnight case: N user-written coroutine triggers all due at one moment.

    python -m benchmarks.triggerer_scale --mode burst --out DIR [--sizes 10000]
                                         [--backends sqlite,postgres] [--workers 2]
                                         [--slots 8] [--profile]

Against one real `deferrun triggerer` and ``--workers`` real `deferrun worker` processes
(``--slots`` each): N tasks defer on ``benchmarks.ops.SleepUntilTrigger`` (``await
asyncio.sleep(...)`` then yield, no ``timer()``), all due at the same moment. Identical
triggers share one run() in the triggerer; with ``--distinct`` each trigger differs (a
sequence number), so each runs as its own coroutine (the per-trigger wrapper's cost). Reported:
triggerer RSS per live trigger (RSS with all N live minus idle RSS), fire lateness p50/p99
(the event's own "fired" stamp minus the moment), event->resume p50/p99, the time from the
moment to the last resume, and the CPU seconds each process (and the PostgreSQL cluster)
spent in the burst. With
``--profile``, py-spy samples the triggerer and the first worker during the burst and the
top frames (self and inclusive) are written to DIR/burst-profile-*.txt.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import anyio

from benchmarks._harness import (
    DbWatch,
    Process,
    database_cpu_seconds,
    env_for,
    free_port,
    pct,
    wait_for,
)
from benchmarks.ops import BurstOp
from deferrun.client import build_task
from deferrun.store import open_store


async def _submit(db: str, ops: list[Any]) -> None:
    store = await open_store(db)
    try:
        tasks = [build_task(op) for op in ops]
        for i in range(0, len(tasks), 5000):
            await store.submit_many(tasks[i : i + 5000])
    finally:
        await store.close()


async def _results(db: str, n: int) -> list[Any]:
    store = await open_store(db)
    try:
        return [t.result for t in await store.list_tasks(limit=n + 10)]
    finally:
        await store.close()


def _running(port: int) -> float:
    from benchmarks.triggerer_scale import gauge, scrape

    return gauge(scrape(port), "deferrun_triggers_running") or 0.0


def _py_spy(pid: int, path: Path, seconds: float) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy") or str(Path(__import__("sys").executable).parent / "py-spy")
    if not Path(exe).exists():
        print("  py-spy not found (pip install py-spy); no profile", flush=True)
        return None
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--format", "raw", "--rate", "200",
         "--duration", str(int(seconds)), "--output", str(path), "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def summarize_profile(raw: Path, top: int = 25) -> str:
    """Top frames by self and inclusive samples from py-spy's collapsed-stack output."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            incl[frame] += n
    lines = [f"samples: {total}", "", "self:"]
    lines += [f"{100 * c / total:5.1f}%  {f}" for f, c in own.most_common(top)]
    lines += ["", "inclusive:"]
    lines += [f"{100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(top)]
    return "\n".join(lines)


def run_burst(
    db: str,
    n: int,
    workdir: Path,
    out_dir: Path,
    *,
    workers: int = 2,
    slots: int = 8,
    defer_rate_guess: float = 1000.0,
    profile: bool = False,
    tag: str = "",
    distinct: bool = False,
) -> dict[str, Any]:
    env = env_for(db)
    port = free_port()
    triggerer = Process(
        ["triggerer", "--capacity", str(n + 100), "--metrics-port", str(port),
         "--metrics-host", "127.0.0.1"],
        env,
        workdir / f"burst-triggerer-{n}.log",
    )  # fmt: skip
    worker_ports = [free_port() for _ in range(workers)]
    worker_procs = [
        Process(
            ["worker", "--slots", str(slots), *_metrics_args(wport)],
            env,
            workdir / f"burst-worker-{n}-{i}.log",
        )
        for i, wport in enumerate(worker_ports)
    ]
    out: dict[str, Any] = {
        "mode": "burst", "n": n, "workers": workers, "slots": slots, "distinct": distinct
    }  # fmt: skip
    watch: DbWatch | None = None
    try:
        wait_for(lambda: "deferrun_triggers_running" in _scrape(port), 30, 0.3)
        time.sleep(1.0)
        idle_rss = triggerer.rss_mib()
        moment = time.time() + n / defer_rate_guess * 1.6 + 8.0
        t0 = time.perf_counter()
        ops = [BurstOp(at=moment, seq=i if distinct else None) for i in range(n)]
        anyio.run(_submit, db, ops)
        # a loaded machine may still be deferring at the moment: then some have fired already
        wait_for(lambda: _running(port) >= n or time.time() >= moment - 0.5, 900, 0.3)
        out["defer_rate_per_s"] = round(n / (time.perf_counter() - t0), 1)
        out["loaded_before_moment"] = _running(port) >= n
        time.sleep(min(1.0, max(0.0, moment - time.time() - 1.5)))
        rss = triggerer.rss_mib()
        procs = [triggerer, *worker_procs]
        watch = DbWatch(db)
        cpu0 = [p.cpu_seconds() for p in procs]
        db_cpu0 = database_cpu_seconds(db)
        calls0 = [store_calls(_scrape(p)) for p in worker_ports]
        spies = []
        if profile:
            budget = 5.0 + n / 1000.0
            for name, proc in (("triggerer", triggerer), ("worker", worker_procs[0])):
                raw = out_dir / f"burst-profile{tag}-{name}-{n}.raw"
                spies.append((name, raw, _py_spy(proc.popen.pid, raw, budget)))
            time.sleep(0.3)
        wait_for(lambda: watch.counts().get("success", 0) >= n, 900, 0.25)
        cpu = [round(p.cpu_seconds() - c, 2) for p, c in zip(procs, cpu0, strict=True)]
        db_cpu1 = database_cpu_seconds(db)
        calls: collections.Counter[str] = collections.Counter()
        for wport, before in zip(worker_ports, calls0, strict=True):
            calls.update(store_calls(_scrape(wport)))
            calls.subtract(before)
        results = [r for r in anyio.run(_results, db, n) if isinstance(r, dict)]
        counts = watch.counts()
        lateness = [r["fired"] - r["at"] for r in results]
        resume = [r["resumed"] - r["fired"] for r in results]
        last = max(r["resumed"] for r in results) - moment
        out.update(
            {
                "triggerer_idle_rss_mib": round(idle_rss, 1),
                "triggerer_rss_mib": round(rss, 1),
                "bytes_per_trigger": round((rss - idle_rss) * 2**20 / n),
                "fire_lateness_p50_ms": round(pct(lateness, 50) * 1000, 1),
                "fire_lateness_p99_ms": round(pct(lateness, 99) * 1000, 1),
                "event_to_resume_p50_ms": round(pct(resume, 50) * 1000, 1),
                "event_to_resume_p99_ms": round(pct(resume, 99) * 1000, 1),
                "last_resumed_after_moment_s": round(last, 2),
                "resumes_per_s": round(n / max(last, 1e-9), 1),
                "cpu_s_triggerer": cpu[0],
                "cpu_s_workers": cpu[1:],
                # the PostgreSQL cluster's own processes (None on SQLite)
                "cpu_s_database": None
                if db_cpu0 is None or db_cpu1 is None
                else round(db_cpu1 - db_cpu0, 2),
                "succeeded": counts.get("success", 0),
                "resumed_once": len(results),
                "lost": n - counts.get("success", 0),
                # store calls (each one round trip or one transaction) by all workers in
                # the burst, per resumed task
                "worker_store_calls_per_task": {
                    k: round(v / n, 3) for k, v in sorted(calls.items()) if v
                },
            }
        )
        for name, raw, spy in spies:
            if spy is None:
                continue
            try:
                spy.wait(60)
            except subprocess.TimeoutExpired:
                spy.kill()
            if raw.exists():
                text = summarize_profile(raw)
                raw.with_suffix(".txt").write_text(text)
                raw.unlink()
                out[f"profile_{name}"] = str(raw.with_suffix(".txt"))
    finally:
        if watch is not None:
            watch.close()
        triggerer.stop()
        for worker in worker_procs:
            worker.stop()
    return out


def _metrics_args(port: int) -> list[str]:
    return ["--metrics-port", str(port), "--metrics-host", "127.0.0.1"]


def store_calls(text: str) -> dict[str, float]:
    """deferrun_store_calls_total by method from a metrics page."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("deferrun_store_calls_total{"):
            method = line.split('method="', 1)[1].split('"', 1)[0]
            out[method] = float(line.rsplit(" ", 1)[1])
    return out


def _scrape(port: int) -> str:
    from benchmarks.triggerer_scale import scrape

    return scrape(port)


HEADERS = [
    "backend",
    "N",
    "workers x slots",
    "B/trigger",
    "fire lateness p50/p99 ms",
    "event->resume p50/p99 ms",
    "last resumed s",
    "CPU s trig / workers / db",
    "lost",
]


def rows_for_table(rows: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            r["backend"],
            r["n"],
            f"{r['workers']} x {r['slots']}",
            r["bytes_per_trigger"],
            f"{r['fire_lateness_p50_ms']} / {r['fire_lateness_p99_ms']}",
            f"{r['event_to_resume_p50_ms']} / {r['event_to_resume_p99_ms']}",
            r["last_resumed_after_moment_s"],
            f"{r['cpu_s_triggerer']} / {r['cpu_s_workers']} / {r.get('cpu_s_database', '-')}",
            r["lost"],
        ]
        for r in rows
    ]
