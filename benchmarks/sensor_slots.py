"""How many worker slots sensors eat in poke, reschedule and deferrable modes.

    python -m benchmarks.sensor_slots --out DIR [--slots 4] [--sensors 200] [--compute 40]
                                      [--stagger 20] [--poke-interval 1]

W worker slots; N sensors whose conditions turn true at staggered times over T seconds; M
compute tasks (each holding its slot ~0.5 s) submitted at the same moment, after the sensors.
Run per mode, plus a baseline without sensors, against a real `deferrun triggerer` and
`deferrun worker`. Reports slot-seconds held by sensors, peak slots held by sensors, compute
makespan, time until every sensor finished, and database calls made for sensors (counted by
the processes themselves: deferrun_store_calls_total, minus the idle rate and the baseline).
Prints a markdown table and writes it to DIR/sensor_slots.md, with DIR/sensor_slots.json and
DIR/sensor_slots.png (busy slots over time).
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
    prepare_out,
    table,
    wait_for,
    write_json,
)
from benchmarks.ops import BenchSensor, Compute
from deferrun.client import build_task
from deferrun.store import open_store

MODES = ["baseline", "poke", "reschedule", "deferrable"]


def store_calls(*ports: int) -> float:
    total = 0.0
    for port in ports:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
                text = resp.read().decode()
        except OSError:
            continue
        total += sum(
            float(line.split()[1])
            for line in text.splitlines()
            if line.startswith("deferrun_store_calls_total{")
        )
    return total


async def _submit(db: str, ops: list[Any]) -> float:
    store = await open_store(db)
    try:
        tasks = [build_task(op) for op in ops]
        t0 = time.time()
        await store.submit_many(tasks)  # one transaction: all submitted at the same moment
        return t0
    finally:
        await store.close()


async def _finished(db: str) -> tuple[int, list[Any]]:
    store = await open_store(db)
    try:
        infos = await store.list_tasks(limit=100_000)
        return sum(i.finished for i in infos), infos
    finally:
        await store.close()


def intervals(log: Path, kind: str) -> list[tuple[float, float]]:
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        k, start, end = line.split()
        if k == kind:
            out.append((float(start), float(end)))
    return out


def peak(spans: list[tuple[float, float]]) -> int:
    edges = sorted(
        [(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1])
    )
    best = cur = 0
    for _, delta in edges:
        cur += delta
        best = max(best, cur)
    return best


def busy_series(
    spans: list[tuple[float, float]], t0: float, end: float, step: float = 0.1
) -> tuple[list[float], list[int]]:
    xs, ys = [], []
    t = t0
    while t <= end:
        xs.append(t - t0)
        ys.append(sum(1 for s, e in spans if s <= t < e))
        t += step
    return xs, ys


def run_mode(mode: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    db = f"sqlite:///{workdir / f'{mode}.db'}"
    log = workdir / f"{mode}.intervals"
    env = env_for(db)
    tport, wport = free_port(), free_port()
    triggerer = Process(
        ["triggerer", "--metrics-port", str(tport), "--metrics-host", "127.0.0.1"],
        env,
        workdir / f"{mode}-triggerer.log",
    )
    worker = Process(
        [
            "worker",
            "--slots",
            str(args.slots),
            "--metrics-port",
            str(wport),
            "--metrics-host",
            "127.0.0.1",
        ],
        env,
        workdir / f"{mode}-worker.log",
    )
    try:
        wait_for(lambda: store_calls(tport, wport) > 0, 30, 0.2)
        quiet0, q0 = store_calls(tport, wport), time.perf_counter()
        time.sleep(3.0)
        idle_rate = (store_calls(tport, wport) - quiet0) / (time.perf_counter() - q0)
        start = time.time() + 0.5
        ops: list[Any] = []
        if mode != "baseline":
            ops += [
                BenchSensor(
                    ready_at=start + args.stagger * (i + 1) / args.sensors,
                    log=str(log),
                    mode=mode,
                    poke_interval=args.poke_interval,
                    timeout=3600,
                )
                for i in range(args.sensors)
            ]
        ops += [Compute(seconds=args.compute_seconds, log=str(log)) for _ in range(args.compute)]
        calls0, c0 = store_calls(tport, wport), time.perf_counter()
        t0 = anyio.run(_submit, db, ops)
        wait_for(lambda: anyio.run(_finished, db)[0] >= len(ops), 1800, 0.2)
        run_seconds = time.perf_counter() - c0
        calls = store_calls(tport, wport) - calls0 - idle_rate * run_seconds
        _, infos = anyio.run(_finished, db)
    finally:
        triggerer.stop()
        worker.stop()
    sensors = intervals(log, "sensor")
    compute = intervals(log, "compute")
    sensor_done = [
        i.finished_at.timestamp()
        for i in infos
        if i.classpath.endswith("BenchSensor") and i.finished_at
    ]
    return {
        "mode": mode,
        "t0": t0,
        "sensor_slot_seconds": round(sum(e - s for s, e in sensors), 2),
        "sensor_peak_slots": peak(sensors),
        "sensor_executions": len(sensors),
        "compute_makespan_s": round(max(e for _, e in compute) - t0, 2),
        "all_sensors_done_s": round(max(sensor_done) - t0, 2) if sensor_done else None,
        "store_calls_net": round(calls),
        "failed": sum(1 for i in infos if i.state != "success"),
        "_sensors": sensors,
        "_compute": compute,
    }


def plot(rows: list[dict[str, Any]], slots: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=(10, 2.2 * len(rows)), sharex=True)
    end = max(
        max([e for _, e in r["_sensors"] + r["_compute"]] or [r["t0"]]) - r["t0"] for r in rows
    )
    for ax, r in zip(axes, rows, strict=True):
        xs, sensor_busy = busy_series(r["_sensors"], r["t0"], r["t0"] + end)
        _, compute_busy = busy_series(r["_compute"], r["t0"], r["t0"] + end)
        ax.stackplot(
            xs,
            sensor_busy,
            compute_busy,
            labels=["sensors", "compute"],
            colors=["#d62728", "#1f77b4"],
            step="post",
        )
        ax.set_ylim(0, slots + 0.5)
        ax.set_ylabel("busy slots")
        ax.set_title(
            f"{r['mode']}: sensors held {r['sensor_slot_seconds']} slot-s, compute "
            f"makespan {r['compute_makespan_s']} s",
            fontsize=10,
        )
        ax.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("seconds since submit")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--sensors", type=int, default=200)
    parser.add_argument("--compute", type=int, default=40)
    parser.add_argument("--compute-seconds", type=float, default=0.5)
    parser.add_argument("--stagger", type=float, default=20.0)
    parser.add_argument("--poke-interval", type=float, default=1.0)
    parser.add_argument("--modes", default=",".join(MODES))
    add_out_argument(parser)
    args = parser.parse_args()
    out_dir = prepare_out(args.out)
    workdir = Path(tempfile.mkdtemp(prefix="deferrun-slots-"))
    rows = []
    for mode in args.modes.split(","):
        row = run_mode(mode, args, workdir)
        rows.append(row)
        print(
            f"  {mode}: makespan {row['compute_makespan_s']} s, sensor slot-s "
            f"{row['sensor_slot_seconds']}",
            flush=True,
        )
    base = next((r for r in rows if r["mode"] == "baseline"), None)
    poke = next((r for r in rows if r["mode"] == "poke"), None)
    for r in rows:
        r["makespan_vs_baseline"] = (
            round(r["compute_makespan_s"] / base["compute_makespan_s"], 2) if base else None
        )
        r["slot_seconds_vs_poke"] = (
            round(r["sensor_slot_seconds"] / poke["sensor_slot_seconds"], 4)
            if poke and poke["sensor_slot_seconds"]
            else None
        )
        if base and r is not base:
            r["store_calls_for_sensors"] = max(0, r["store_calls_net"] - base["store_calls_net"])
    headers = [
        "mode",
        "sensor slot-s",
        "vs poke",
        "peak sensor slots",
        "compute makespan s",
        "vs baseline",
        "all sensors done s",
        "DB calls for sensors",
        "failed",
    ]
    lines = [
        [
            r["mode"],
            r["sensor_slot_seconds"],
            r["slot_seconds_vs_poke"],
            r["sensor_peak_slots"],
            r["compute_makespan_s"],
            r["makespan_vs_baseline"],
            r["all_sensors_done_s"],
            r.get("store_calls_for_sensors", "-"),
            r["failed"],
        ]
        for r in rows
    ]
    out = {
        "machine": machine(),
        "params": vars(args),
        "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
    }
    path = write_json(out_dir, "sensor_slots", out)
    md = table(headers, lines)
    path.with_suffix(".md").write_text(md + "\n")
    png = path.with_suffix(".png")
    try:
        plot(rows, args.slots, png)
    except ImportError:
        png = None  # type: ignore[assignment]
    print(
        f"\n{args.sensors} sensors + {args.compute} compute tasks on {args.slots} slots "
        f"({out['machine']['cores']} cores)\n"
    )
    print(md)
    print(f"\nwritten: {path}" + (f", {png}" if png else ""))


if __name__ == "__main__":
    main()
