"""How many time triggers one triggerer holds, and how well it keeps time.

    python -m benchmarks.triggerer_scale --out DIR [--sizes 1000,10000,100000]
                                         [--backends sqlite,postgres]

For each backend and size N, against one real `deferrun triggerer` and `deferrun worker`:
1. N tasks are bulk-submitted; each defers on a DateTimeTrigger. Defer rate = N / (first
   submit -> all deferred). Once the triggerer holds all N: RSS above its idle RSS per live
   trigger, and its CPU while waiting.
2. The moments are spread over a fire window; fire lateness p50/p99 comes from the
   triggerer's own histogram (deferrun_timer_fire_lateness_seconds), moment->resume p50/p99
   from the resumed tasks, drain rate = N / (first moment -> last success).
3. Nothing lost: every task succeeds, exactly once.
Prints a table and writes DIR/triggerer_scale.json and DIR/triggerer_scale.png (RSS per
trigger and lateness).

``--mode heap`` holds 1,000,000 time triggers in this process (benchmarks/timer_heap_scale.py):
memory and fire lateness at ``--fire-rate`` (default 5,000/s there), no database.

``--mode heap --db postgres`` (or ``sqlite``) runs the same case in one real ``deferrun
triggerer`` process that claims N bulk-stored timers from a database and stores their events
(benchmarks/timer_db_scale.py); writes DIR/triggerer_scale-heap-db.json.

``--mode burst`` runs the midnight case instead (benchmarks/burst.py): N user-written coroutine
triggers all due at one moment, 2 workers x 8 slots; writes DIR/triggerer_scale-burst.json.
"""

from __future__ import annotations

import argparse
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
from benchmarks.burst import HEADERS as BURST_HEADERS
from benchmarks.burst import rows_for_table as burst_rows
from benchmarks.burst import run_burst
from benchmarks.ops import AtMoment
from deferrun.client import build_task
from deferrun.store import open_store


def scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            return resp.read().decode()
    except OSError:
        return ""  # not listening yet


def gauge(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def deferred_count(port: int) -> float:
    for line in scrape(port).splitlines():
        if line.startswith('deferrun_tasks_total{state="deferred"}'):
            return float(line.split()[1])
    return 0.0


def histogram_quantile(text: str, name: str, q: float) -> float | None:
    """Prometheus-style quantile from cumulative buckets (linear within a bucket)."""
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.split()[1])))
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return prev_bound
            span = count - prev_count
            frac = (rank - prev_count) / span if span else 0.0
            return prev_bound + (bound - prev_bound) * frac
        prev_bound, prev_count = bound, count
    return prev_bound


async def _submit(db: str, ops: list[Any]) -> None:
    store = await open_store(db)
    try:
        tasks = [build_task(op) for op in ops]
        for i in range(0, len(tasks), 5000):
            await store.submit_many(tasks[i : i + 5000])
    finally:
        await store.close()


async def _counts(db: str) -> dict[str, int]:
    store = await open_store(db)
    try:
        return await store.count_tasks()
    finally:
        await store.close()


async def _results(db: str, n: int) -> list[Any]:
    store = await open_store(db)
    try:
        return [t.result for t in await store.list_tasks(limit=n + 10)]
    finally:
        await store.close()


def run_one(
    db: str,
    n: int,
    workdir: Path,
    defer_rate_guess: float,
    workers: int = 1,
    fire_rate: float = 2000.0,
) -> dict[str, Any]:
    env = env_for(db)
    port = free_port()
    triggerer = Process(
        [
            "triggerer",
            "--capacity",
            str(n + 100),
            "--metrics-port",
            str(port),
            "--metrics-host",
            "127.0.0.1",
        ],
        env,
        workdir / f"triggerer-{n}.log",
    )
    wports = [free_port() for _ in range(workers)]
    worker_procs = [
        Process(
            ["worker", "--slots", "16", "--metrics-port", str(wp), "--metrics-host", "127.0.0.1"],
            env,
            workdir / f"worker-{n}-{i}.log",
        )
        for i, wp in enumerate(wports)
    ]
    out: dict[str, Any] = {"n": n, "workers": workers}
    try:
        wait_for(lambda: gauge(scrape(port), "deferrun_triggers_running") is not None, 30, 0.3)
        time.sleep(1.0)
        idle_rss = triggerer.rss_mib()
        load_estimate = n / defer_rate_guess
        window = max(1.0, n / fire_rate)  # moments spread at fire_rate per second
        fire_base = time.time() + load_estimate * 1.6 + 8.0
        spacing = window / n
        ops = [AtMoment(at=fire_base + i * spacing) for i in range(n)]
        t0 = time.perf_counter()
        anyio.run(_submit, db, ops)
        submitted = time.perf_counter() - t0
        # Counted by the worker itself: early moments may fire before the last task defers.
        wait_for(lambda: sum(deferred_count(wp) for wp in wports) >= n, 900, 0.2)
        defer_seconds = time.perf_counter() - t0
        wait_for(lambda: (gauge(scrape(port), "deferrun_triggers_running") or 0) >= n, 300, 0.5)
        claimed_seconds = time.perf_counter() - t0
        loaded_before_fire = time.time() < fire_base
        time.sleep(2.0)
        rss = triggerer.rss_mib()
        cpu0 = triggerer.cpu_seconds()
        quiet = max(0.0, min(5.0, fire_base - time.time() - 0.5))
        time.sleep(quiet)
        cpu_waiting = (triggerer.cpu_seconds() - cpu0) / quiet if quiet else float("nan")
        wait_for(lambda: anyio.run(_counts, db).get("success", 0) >= n, window + 900, 0.5)
        drained_at = time.time()
        text = scrape(port)
        results = [r for r in anyio.run(_results, db, n) if isinstance(r, dict)]
        counts = anyio.run(_counts, db)
        resume_lat = [r["resumed"] - r["at"] for r in results]
        out.update(
            {
                "submit_seconds": round(submitted, 2),
                "defer_rate_per_s": round(n / defer_seconds, 1),
                "all_claimed_seconds": round(claimed_seconds, 1),
                "loaded_before_first_moment": loaded_before_fire,
                "triggerer_idle_rss_mib": round(idle_rss, 1),
                "triggerer_rss_mib": round(rss, 1),
                "bytes_per_trigger": round((rss - idle_rss) * 2**20 / n),
                "cpu_while_waiting_pct": round(cpu_waiting * 100, 1),
                "fire_window_s": round(window, 1),
                "fire_lateness_p50_ms": round(
                    (histogram_quantile(text, "deferrun_timer_fire_lateness_seconds", 0.5) or 0)
                    * 1000,
                    2,
                ),
                "fire_lateness_p99_ms": round(
                    (histogram_quantile(text, "deferrun_timer_fire_lateness_seconds", 0.99) or 0)
                    * 1000,
                    2,
                ),
                "moment_to_resume_p50_ms": round(pct(resume_lat, 50) * 1000, 1),
                "moment_to_resume_p99_ms": round(pct(resume_lat, 99) * 1000, 1),
                "drain_rate_per_s": round(n / max(drained_at - fire_base, 1e-9), 1),
                "succeeded": counts.get("success", 0),
                "resumed_once": len(results),
                "lost": n - counts.get("success", 0),
            }
        )
    finally:
        triggerer.stop()
        for worker in worker_procs:
            worker.stop()
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for backend in sorted({r["backend"] for r in rows}):
        mine = [r for r in rows if r["backend"] == backend]
        ns = [r["n"] for r in mine]
        ax1.plot(ns, [r["bytes_per_trigger"] for r in mine], marker="o", label=backend)
        ax2.plot(ns, [r["fire_lateness_p99_ms"] for r in mine], marker="o", label=backend)
    ax1.axhline(5000, color="red", linestyle="--", label="target 5 KB")
    for ax, title in ((ax1, "RSS per live trigger (bytes)"), (ax2, "fire lateness p99 (ms)")):
        ax.set_xscale("log")
        ax.set_xlabel("live time triggers")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main_heap(args: argparse.Namespace, out_dir: Path) -> None:
    from benchmarks.timer_heap_scale import HEADERS as HEAP_HEADERS
    from benchmarks.timer_heap_scale import rows_for_table as heap_rows
    from benchmarks.timer_heap_scale import run_heap

    fire_rate = args.fire_rate if args.fire_rate != 2000.0 else 5000.0  # heap default: 5,000/s
    if args.db:
        main_heap_db(args, out_dir, fire_rate)
        return
    rows = []
    for n in [int(x) for x in (args.sizes or "1000000").split(",")]:
        row = run_heap(n, fire_rate, args.measure)
        rows.append(row)
        print(f"  heap N={n}: {row}", flush=True)
    out = {"machine": machine(), "runs": rows}
    path = write_json(out_dir, "triggerer_scale-heap", out)
    print(f"\ntimer heap, in one process ({out['machine']['cores']} cores)\n")
    print(table(HEAP_HEADERS, heap_rows(rows)))
    print(f"\nwritten: {path}")


def main_heap_db(args: argparse.Namespace, out_dir: Path, fire_rate: float) -> None:
    from benchmarks.timer_db_scale import HEADERS as DB_HEADERS
    from benchmarks.timer_db_scale import rows_for_table as db_rows
    from benchmarks.timer_db_scale import run_many

    sizes = [int(x) for x in (args.sizes or "1000000").split(",")]
    rows = run_many(args.db.split(","), sizes, fire_rate, args.window)
    out = {"machine": machine(), "runs": rows}
    path = write_json(out_dir, "triggerer_scale-heap-db", out)
    print(
        f"\ntime triggers in one real triggerer, with a database ({out['machine']['cores']} cores)"
    )
    print()
    print(table(DB_HEADERS, db_rows(rows)))
    print(f"\nwritten: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--mode",
        choices=["timers", "burst", "heap"],
        default="timers",
        help="timers: DateTimeTriggers spread over a window; burst: user-written coroutine "
        "triggers all due at one moment (see benchmarks/burst.py); heap: 1,000,000 time "
        "triggers in this process, no database (see benchmarks/timer_heap_scale.py)",
    )
    parser.add_argument("--sizes", default=None, help="default 1000,10000,100000 (burst: 10000)")
    parser.add_argument("--slots", type=int, default=None, help="slots per worker (burst: 8)")
    parser.add_argument("--profile", action="store_true", help="burst: py-spy the burst")
    parser.add_argument(
        "--distinct",
        action="store_true",
        help="burst: triggers differ (each its own run()) instead of identical (one shared run)",
    )
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument(
        "--workers", type=int, default=None, help="worker processes (timers: 1, burst: 2)"
    )
    parser.add_argument(
        "--fire-rate",
        type=float,
        default=2000.0,
        help="moments are spread so that this many triggers fire per second",
    )
    parser.add_argument(
        "--defer-rate-guess",
        type=float,
        default=1000.0,
        help="used to schedule the moments after the load finishes",
    )
    parser.add_argument(
        "--measure", type=float, default=30.0, help="heap: seconds of firing measured"
    )
    parser.add_argument(
        "--db",
        default=None,
        help="heap: postgres and/or sqlite (comma-separated): one real triggerer process "
        "claims the timers from that database (see benchmarks/timer_db_scale.py)",
    )
    parser.add_argument(
        "--window", type=int, default=250_000, help="heap --db: how many timers fire (measured)"
    )
    add_out_argument(parser)
    args = parser.parse_args()
    out_dir = prepare_out(args.out)
    if args.db and args.mode != "heap":
        parser.error("--db goes with --mode heap")
    if args.mode == "heap":
        main_heap(args, out_dir)
        return
    burst = args.mode == "burst"
    sizes = [int(x) for x in (args.sizes or ("10000" if burst else "1000,10000,100000")).split(",")]
    workers = args.workers or (2 if burst else 1)
    rows: list[dict[str, Any]] = []
    workdir = Path(tempfile.mkdtemp(prefix="deferrun-scale-"))
    for backend in args.backends.split(","):
        cluster = None
        rate_guess = args.defer_rate_guess
        for n in sizes:
            if backend == "postgres":
                cluster = cluster or start_pg_cluster()
                db = cluster.create_database()
            else:
                db = f"sqlite:///{workdir / f'scale-{n}.db'}"
            if burst:
                row = run_burst(
                    db, n, workdir, out_dir, workers=workers, slots=args.slots or 8,
                    defer_rate_guess=rate_guess, profile=args.profile, tag=f"-{backend}",
                    distinct=args.distinct,
                )  # fmt: skip
            else:
                row = run_one(db, n, workdir, rate_guess, workers, args.fire_rate)
            rate_guess = row["defer_rate_per_s"]  # schedule the next, larger run after it
            row["backend"] = backend
            rows.append(row)
            print(f"  {backend} N={n}: {row}", flush=True)
        if cluster is not None:
            cluster.destroy()
    out = {"machine": machine(), "runs": rows}
    if burst:
        path = write_json(out_dir, "triggerer_scale-burst", out)
        print(
            f"\nburst: user-written triggers due at one moment ({out['machine']['cores']} cores)\n"
        )
        print(table(BURST_HEADERS, burst_rows(rows)))
        print(f"\nwritten: {path}")
        return
    path = write_json(out_dir, "triggerer_scale", out)
    png = path.with_suffix(".png")
    try:
        plot(rows, png)
    except ImportError:
        png = None  # type: ignore[assignment]
    print(f"\ntriggerer scale ({out['machine']['cores']} cores)\n")
    print(
        table(
            [
                "backend",
                "N",
                "workers",
                "defer/s",
                "B/trigger",
                "CPU waiting",
                "lateness p50/p99 ms",
                "moment->resume p50/p99 ms",
                "drain/s",
                "lost",
            ],
            [
                [
                    r["backend"],
                    r["n"],
                    r["workers"],
                    r["defer_rate_per_s"],
                    r["bytes_per_trigger"],
                    f"{r['cpu_while_waiting_pct']} %",
                    f"{r['fire_lateness_p50_ms']} / {r['fire_lateness_p99_ms']}",
                    f"{r['moment_to_resume_p50_ms']} / {r['moment_to_resume_p99_ms']}",
                    r["drain_rate_per_s"],
                    r["lost"],
                ]
                for r in rows
            ],
        )
    )
    print(f"\nwritten: {path}" + (f", {png}" if png else ""))


if __name__ == "__main__":
    main()
