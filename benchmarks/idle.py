"""How many database calls an idle worker + triggerer make on PostgreSQL.

    python -m benchmarks.idle --out DIR [--window 60] [--poll-intervals default,1]

For each poll interval ("default" = what the processes pick themselves), one real
`deferrun worker` and one `deferrun triggerer` run against a fresh PostgreSQL with nothing
to do; after a warm-up, their deferrun_store_calls_total counters (one count per round trip
or transaction) are read twice ``--window`` seconds apart. Reported: calls per second by
method, heartbeats apart. Writes DIR/idle.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._harness import (
    Process,
    add_out_argument,
    env_for,
    free_port,
    machine,
    prepare_out,
    start_pg_cluster,
    table,
    wait_for,
    write_json,
)
from benchmarks.triggerer_scale import scrape


def store_calls(port: int) -> dict[str, float]:
    calls: dict[str, float] = {}
    for line in scrape(port).splitlines():
        if line.startswith("deferrun_store_calls_total{"):
            method = line.split('method="', 1)[1].split('"', 1)[0]
            calls[method] = calls.get(method, 0.0) + float(line.split()[1])
    return calls


def run_idle(db: str, poll: str, window: float, workdir: Path) -> dict[str, Any]:
    extra = {} if poll == "default" else {"DEFERRUN_POLL_INTERVAL": poll}
    env = env_for(db, **extra)
    ports = {"worker": free_port(), "triggerer": free_port()}
    procs = {
        role: Process(
            [role, "--metrics-port", str(port), "--metrics-host", "127.0.0.1"],
            env,
            workdir / f"idle-{role}-{poll}.log",
        )
        for role, port in ports.items()
    }
    try:
        for port in ports.values():
            wait_for(lambda p=port: bool(store_calls(p)), 30, 0.3)
        time.sleep(12.0)  # past the first reap (dead_after) and the start-up calls
        before = {role: store_calls(port) for role, port in ports.items()}
        t0 = time.monotonic()
        time.sleep(window)
        after = {role: store_calls(port) for role, port in ports.items()}
        elapsed = time.monotonic() - t0
    finally:
        for proc in procs.values():
            proc.stop()
    per_s: dict[str, float] = {}
    for role in ports:
        for method, n in after[role].items():
            rate = (n - before[role].get(method, 0.0)) / elapsed
            if rate:
                per_s[f"{role}.{method}"] = round(rate, 3)
    heartbeats = sum(v for k, v in per_s.items() if k.endswith(".heartbeat"))
    return {
        "poll_interval": poll,
        "window_s": round(elapsed, 1),
        "calls_per_s": per_s,
        "heartbeats_per_s": round(heartbeats, 3),
        "other_per_s": round(sum(per_s.values()) - heartbeats, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--window", type=float, default=60.0, help="seconds counted")
    parser.add_argument(
        "--poll-intervals",
        default="default,1",
        help="comma list: 'default' (the processes' own choice) or seconds "
        "(DEFERRUN_POLL_INTERVAL); 1 is the interval before wake-ups were trusted",
    )
    add_out_argument(parser)
    args = parser.parse_args()
    out_dir = prepare_out(args.out)
    workdir = Path(tempfile.mkdtemp(prefix="deferrun-idle-"))
    cluster = start_pg_cluster()
    rows = []
    try:
        for poll in args.poll_intervals.split(","):
            row = run_idle(cluster.create_database(), poll, args.window, workdir)
            rows.append(row)
            print(f"  poll={poll}: {row}", flush=True)
    finally:
        cluster.destroy()
    path = write_json(out_dir, "idle", {"machine": machine(), "runs": rows})
    print("\nidle worker + triggerer on PostgreSQL: database calls per second\n")
    print(
        table(
            ["poll interval", "heartbeats/s", "other calls/s", "by method"],
            [
                [
                    r["poll_interval"],
                    r["heartbeats_per_s"],
                    r["other_per_s"],
                    ", ".join(
                        f"{k} {v}"
                        for k, v in sorted(r["calls_per_s"].items())
                        if not k.endswith("heartbeat")
                    ),
                ]
                for r in rows
            ],
        )
    )
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
