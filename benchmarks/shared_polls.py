"""Shared polls at scale: requests per poll interval when 1,000 tasks wait on overlapping
things, in one real `deferrun triggerer` (and a worker that resumes them).

    python -m benchmarks.shared_polls --out DIR [--tasks 1000] [--poll-interval 5]
                                      [--intervals 3]

Three cases: 1,000 S3KeyTriggers on distinct keys under one prefix (moto behind a counting
proxy), 1,000 JobStatusTriggers on one job run, 1,000 identical HttpTriggers (both counted by
the fake API server). For each: requests per poll interval, triggerer CPU while waiting, RSS
per waiting task (above the idle triggerer), then the condition is made true and every
task's resumes are counted (none lost, none twice). Writes DIR/shared_polls.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import anyio

from benchmarks._harness import (
    FakeServices,
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
from benchmarks.builtin_triggers import _submit, metric, start_counted_moto
from benchmarks.ops import WaitOn


def measure(
    kind: str,
    ops: list[WaitOn],
    log: Path,
    interval: float,
    intervals: int,
    env_extra: dict[str, str],
    counter: Any,
    make_true: Any,
    workdir: Path,
) -> dict[str, Any]:
    n = len(ops)
    db = f"sqlite:///{workdir / f'{kind}.db'}"
    env = env_for(db, **env_extra)
    port = free_port()
    args = ["triggerer", "--capacity", str(n + 10), "--metrics-port", str(port)]
    triggerer = Process([*args, "--metrics-host", "127.0.0.1"], env, workdir / f"{kind}-t.log")
    worker = Process(["worker", "--slots", "8"], env, workdir / f"{kind}-worker.log")
    try:
        wait_for(lambda: metric(port, "deferrun_triggers_running") is not None, 30)
        idle_rss = triggerer.rss_mib()
        anyio.run(_submit, db, ops)
        wait_for(lambda: metric(port, "deferrun_triggers_running") == n, 300, 0.5)
        time.sleep(interval * 1.5)  # first polls and client creation pass
        c0, cpu0, t0 = counter(), triggerer.cpu_seconds(), time.perf_counter()
        time.sleep(interval * intervals)
        c1, cpu1, t1 = counter(), triggerer.cpu_seconds(), time.perf_counter()
        rss = triggerer.rss_mib()
        members = _members(port)
        make_true()
        fired_at = time.perf_counter()
        wait_for(lambda: sum(_resumes(log).values()) >= n, 300, 0.5)
        time.sleep(interval)  # a second resume of any task would show up by now
        drained = time.perf_counter() - fired_at
        resumes = _resumes(log)
        task_ids = {line.split()[0] for line in log.read_text().splitlines()}
        return {
            "tasks": n,
            "poll_interval_s": interval,
            "requests_per_poll_interval": round((c1 - c0) / ((t1 - t0) / interval), 1),
            "triggerer_cpu_pct": round((cpu1 - cpu0) / (t1 - t0) * 100, 2),
            "triggerer_rss_mib": round(rss, 1),
            "rss_per_waiting_task_bytes": round((rss - idle_rss) * 2**20 / n),
            "shared_poll_members": members,
            "resumed_once": sum(1 for c in resumes.values() if c == 1),
            "resumed_twice_or_more": sum(1 for c in resumes.values() if c > 1),
            "lost": n - len(task_ids),
            "all_resumed_after_s": round(drained, 1),
        }
    finally:
        triggerer.stop()
        worker.stop()


def _resumes(log: Path) -> Counter[str]:
    return Counter(log.read_text().split()) if log.exists() else Counter()


def _members(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("deferrun_shared_poll_members{"):
            name, value = line.rsplit(" ", 1)
            out[name.split('poll="', 1)[1].rstrip('"}')] = float(value)
    return out


def _start_run(services: FakeServices) -> str:
    request = urllib.request.Request(
        f"http://127.0.0.1:{services.port}/api/runs",
        data=json.dumps({"polls": 10**9}).encode(),
        headers={"Content-Type": "application/json", "Authorization": _basic()},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        return str(json.loads(resp.read())["data"]["id"])


def _basic() -> str:
    import base64

    from tests.support.services import PASSWORD, USER

    return "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--poll-interval", type=float, default=5.0)
    parser.add_argument("--intervals", type=int, default=3)
    add_out_argument(parser)
    args = parser.parse_args()
    out_dir = prepare_out(args.out)
    n, interval = args.tasks, args.poll_interval
    workdir = Path(tempfile.mkdtemp(prefix="deferrun-bench-shared-"))

    import boto3

    moto, proxy, moto_port = start_counted_moto()
    s3 = boto3.client(
        "s3",
        region_name="us-east-1",
        endpoint_url=f"http://127.0.0.1:{moto_port}",
        aws_access_key_id="k",
        aws_secret_access_key="s",
    )
    s3.create_bucket(Bucket="landing")
    services = FakeServices()
    services.start()
    results: dict[str, Any] = {}
    try:
        keys = [f"in/2026-11-29/part-{i:05}.csv" for i in range(n)]
        log = workdir / "s3.log"
        results["s3"] = measure(
            "s3",
            [
                WaitOn(
                    trigger="triggers.s3.S3KeyTrigger",
                    trigger_kwargs={
                        "bucket_name": "landing",
                        "bucket_key": k,
                        "poll_interval": interval,
                    },
                    log=str(log),
                )
                for k in keys
            ],
            log,
            interval,
            args.intervals,
            {
                "DEFERRUN_CONN_AWS_DEFAULT": "aws://k:s@?region_name=us-east-1&endpoint_url="
                f"http%3A%2F%2F127.0.0.1%3A{proxy.port}"
            },
            lambda: proxy.count,
            lambda: [s3.put_object(Bucket="landing", Key=k, Body=b"x") for k in keys],
            workdir,
        )
        run_id = _start_run(services)
        log = workdir / "job.log"
        results["job"] = measure(
            "job",
            [
                WaitOn(
                    trigger="triggers.job.JobStatusTrigger",
                    trigger_kwargs={
                        "status_endpoint": f"api/runs/{run_id}",
                        "http_conn_id": "http_default",
                        "status_field": "state.life_cycle",
                        "poll_interval": interval,
                    },
                    log=str(log),
                )
                for _ in range(n)
            ],
            log,
            interval,
            args.intervals,
            {"DEFERRUN_CONN_HTTP_DEFAULT": services.uri()},
            lambda: services.requests[f"/api/runs/{run_id}"],
            lambda: setattr(services.runs[run_id], "polls_to_finish", 0),
            workdir,
        )
        log = workdir / "http.log"
        results["http"] = measure(
            "http",
            [
                WaitOn(
                    trigger="triggers.http.HttpTrigger",
                    trigger_kwargs={"endpoint": "health/orders", "poll_interval": interval},
                    log=str(log),
                )
                for _ in range(n)
            ],
            log,
            interval,
            args.intervals,
            {"DEFERRUN_CONN_HTTP_DEFAULT": services.uri()},
            lambda: services.requests["/health/orders"],
            lambda: services.ready.update({"orders": {"state": "ready"}}),
            workdir,
        )
    finally:
        services.stop()
        moto.stop()
    out = {"machine": machine(), **results}
    path = write_json(out_dir, "shared_polls", out)
    rows = [
        [
            label,
            r["tasks"],
            r["requests_per_poll_interval"],
            f"{r['triggerer_cpu_pct']} %",
            f"{r['rss_per_waiting_task_bytes']} B",
            f"{r['resumed_once']} / {r['resumed_twice_or_more']} / {r['lost']}",
        ]
        for label, r in (
            ("S3KeyTrigger, distinct keys under one prefix", results["s3"]),
            ("JobStatusTrigger, one job run", results["job"]),
            ("HttpTrigger, identical", results["http"]),
        )
    ]
    print(f"\n{n} waiting tasks per case, one triggerer ({out['machine']['cores']} cores)\n")
    print(
        table(
            [
                "case",
                "tasks",
                "requests / interval",
                "triggerer CPU",
                "RSS / waiting task",
                "resumed once / twice / lost",
            ],
            rows,
        )
    )
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
